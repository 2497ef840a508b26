"""Checks on the embedded default dataset and tokenizer (tests/assets/, see LICENSE-DATA.md)."""

import collections
import os
import re
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS = ASSETS / "corpus"
TOKENIZER = ASSETS / "tokenizer"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    cache = str(tmp_path_factory.mktemp("hf_cache"))
    return {
        split: datasets.load_dataset(str(CORPUS), split=split, cache_dir=cache)
        for split in ("train", "validation")
    }


def test_tokenizer_loads_and_round_trips():
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(str(TOKENIZER))
    assert tok.get_vocab_size() < 2048
    assert tok.bos_id == 0 and tok.bos_token == BOS
    assert tok.eos_id == 1 and tok.eos_token == EOS
    text = "The quick brown fox jumps over the lazy dog, and Python's list.sort() is stable!"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 0 and ids[-1] == 1
    assert all(0 <= i < 2048 for i in ids)
    assert tok.decode(ids[1:-1]) == text
    assert len(ids) < len(text) / 2  # the BPE actually merges


def test_corpus_both_splits(corpus):
    train, val = corpus["train"], corpus["validation"]
    assert train.column_names == ["text"] and val.column_names == ["text"]
    assert len(train) > 1000 and 0 < len(val) < len(train) / 10
    train_bytes = sum(len(t.encode()) for t in train["text"])
    assert train_bytes > 1_000_000
    assert set(train["text"]).isdisjoint(val["text"])


def test_corpus_is_english(corpus):
    words = collections.Counter()
    for t in corpus["train"]["text"][:300]:
        words.update(re.findall(r"[a-z']+", t.lower()))
    top = {w for w, _ in words.most_common(10)}
    assert {"the", "a", "of", "to"} <= top
