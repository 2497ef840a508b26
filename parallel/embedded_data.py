"""The embedded datasets the shipped configs train and validate on (tests/assets/corpus).

`register_datasets()` adds `embedded` and `embedded_validation` to torchtitan's
dataset registry; `parallel.train` calls it before the trainer is built.
"""

import functools
from pathlib import Path

from datasets import load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "corpus"


def _json_split(path: str):
    return load_dataset("json", data_files=path, split="train")


def _text(sample: dict) -> str:
    return sample["text"]


@functools.cache
def register_datasets() -> None:
    for name, file in (("embedded", "train.jsonl.gz"), ("embedded_validation", "validation.jsonl.gz")):
        DATASETS[name] = DatasetConfig(path=str(CORPUS / file), loader=_json_split, sample_processor=_text)
