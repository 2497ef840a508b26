"""The embedded datasets and tokenizer (tests/assets), and where a job's data and tokenizer come from.

`register_datasets()` adds `embedded` and `embedded_validation` to torchtitan's
dataset registry; `parallel.train` calls it before the trainer is built.

`resolve_data(job_config)` runs at start-up, before anything is built: relative paths
start at the working directory, as torchtitan reads them. torchtitan's own TOMLs name
its test assets relative to a torchtitan checkout (`dataset = "c4_test"`, read from
`tests/assets/c4_test`, and `hf_assets_path = "./tests/assets/tokenizer"`): where the
working directory has no such folder, the embedded copies stand in, said once at
start-up, so that those TOMLs run from anywhere. A data set that cannot be read (an
unknown name, or the Hub while offline) or a tokenizer folder that does not exist is
a ValueError naming the setting.
"""

import functools
import importlib
import os
from pathlib import Path

import datasets
from datasets import load_dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"
CORPUS = ASSETS / "corpus"
TOKENIZER = ASSETS / "tokenizer"

TORCHTITAN_TEST_TOKENIZER = "tests/assets/tokenizer"  # torchtitan's TOMLs: "./tests/assets/tokenizer"
TORCHTITAN_TEST_DATASET = "c4_test"
_TORCHTITAN_C4_TEST = DATASETS[TORCHTITAN_TEST_DATASET]  # kept: each job decides afresh which one it reads


def _json_split(path: str):
    return load_dataset("json", data_files=path, split="train")


def _text(sample: dict) -> str:
    return sample["text"]


@functools.cache
def register_datasets() -> None:
    for name, file in (("embedded", "train.jsonl.gz"), ("embedded_validation", "validation.jsonl.gz")):
        DATASETS[name] = DatasetConfig(path=str(CORPUS / file), loader=_json_split, sample_processor=_text)


def _offline() -> bool:
    """Whether the Hugging Face libraries may not reach the Hub (run_train.sh's default)."""
    return bool(datasets.config.HF_HUB_OFFLINE)


def _resolve_dataset(section: str, name: str, path: str | None) -> str | None:
    """Check `{section}.dataset` (+ `dataset_path`); a start-up note where the embedded corpus stands in."""
    key = name.lower()  # as torchtitan looks it up
    if key not in DATASETS:
        raise ValueError(f"{section}.dataset={name!r} is not a known dataset (known: {', '.join(sorted(DATASETS))}); "
                         f"register yours through experimental.custom_import, or give a known one's files "
                         f"as {section}.dataset_path")
    if key == TORCHTITAN_TEST_DATASET:
        if path is None and not os.path.exists(_TORCHTITAN_C4_TEST.path):
            DATASETS[key] = DATASETS["embedded"]
            return (f"{section}.dataset={name!r}: {Path.cwd()} has no {_TORCHTITAN_C4_TEST.path} (torchtitan's "
                    f"test data, in its checkout), so the embedded corpus stands in ({DATASETS[key].path})")
    source = path or DATASETS[key].path
    if not os.path.exists(source) and _offline():
        what = (f"{section}.dataset_path={path!r} is not a local file or folder (relative paths start at "
                f"{Path.cwd()})" if path is not None else
                f"{section}.dataset={name!r} reads {source} from the Hugging Face Hub")
        raise ValueError(f"{what}, and this run is offline (HF_HUB_OFFLINE=1, run_train.sh's default): point "
                         f"{section}.dataset_path at a local copy, or go online with HF_HUB_OFFLINE=0 "
                         "HF_DATASETS_OFFLINE=0")
    return None


def _resolve_tokenizer(model) -> str | None:
    """Check `model.hf_assets_path`; a start-up note where the embedded tokenizer stands in."""
    path = model.hf_assets_path
    if not path or os.path.isdir(path):
        return None
    if os.path.normpath(path) == TORCHTITAN_TEST_TOKENIZER:
        model.hf_assets_path = str(TOKENIZER)
        return (f"model.hf_assets_path={path!r}: {Path.cwd()} has no such folder (torchtitan's test "
                f"tokenizer, in its checkout), so the embedded tokenizer stands in ({TOKENIZER})")
    raise ValueError(f"model.hf_assets_path={path!r} is not a folder (relative paths start at {Path.cwd()}): "
                     "point it at the folder that holds your tokenizer.json")


def resolve_data(job_config) -> list[str]:
    """The start-up checks of the job's tokenizer and data sets (see the module docstring):
    the notes to log once, or a ValueError naming the setting."""
    register_datasets()
    DATASETS[TORCHTITAN_TEST_DATASET] = _TORCHTITAN_C4_TEST
    if job_config.experimental.custom_import:
        # torchtitan imports it in Trainer.__init__ too (a no-op then): datasets it registers count
        importlib.import_module(job_config.experimental.custom_import)
    training, validation = job_config.training, job_config.validation
    notes = [_resolve_tokenizer(job_config.model),
             _resolve_dataset("training", training.dataset, training.dataset_path)]
    if validation.enable:
        notes.append(_resolve_dataset("validation", validation.dataset, validation.dataset_path))
    return [note for note in notes if note]
