#!/usr/bin/env python3
"""Regenerate the embedded default dataset and tokenizer in ``tests/assets/``.

What it builds
--------------
* ``tests/assets/corpus/train.jsonl.gz`` and ``validation.jsonl.gz``:
  one JSON object per line, ``{"text": "..."}``; each document is a few
  paragraphs of English prose taken from the Python 3.11 documentation.
  About 5 % of the documents (chosen by a hash of their id, so the split is
  stable) are held out as the validation split.  Readable offline with
  ``datasets.load_dataset("tests/assets/corpus", split="train" | "validation")``.
* ``tests/assets/tokenizer/tokenizer.json`` (+ ``tokenizer_config.json``):
  a byte-level BPE with 2000 entries trained with the ``tokenizers`` library
  on the train split only.  ``<|begin_of_text|>`` is id 0 and
  ``<|end_of_text|>`` is id 1; ``tokenizer_config.json`` names them as
  ``bos_token`` / ``eos_token`` so torchtitan's ``HuggingFaceTokenizer``
  adds BOS/EOS.

Source (see LICENSE-DATA.md)
----------------------------
The reStructuredText sources of the Python documentation, as shipped in the
Debian bookworm package ``python3.11-doc`` version 3.11.2-6+deb12u8
(directory ``/usr/share/doc/python3.11/html/_sources``).  License: PSF
License Agreement (Python documentation).  Nothing is downloaded by this
script.  To get the source on a machine without it, any of:

    apt-get install python3.11-doc                      # then run with no --source
    apt-get download python3.11-doc                     # then --source python3.11-doc_*.deb

Usage
-----
    python tests/assets/make_assets.py                  # corpus + tokenizer
    python tests/assets/make_assets.py --source X.deb   # source from a .deb / directory
    python tests/assets/make_assets.py --tokenizer-only # retrain tokenizer from the shipped corpus

Both steps are deterministic: the same source gives byte-identical files
(gzip mtime is fixed to 0, documents are processed in sorted path order, and
BPE training is single-input, ordered).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS_DIR = HERE / "corpus"
TOKENIZER_DIR = HERE / "tokenizer"

DEFAULT_SOURCE = Path("/usr/share/doc/python3.11/html/_sources")
DEB_SOURCE_SUBDIR = "usr/share/doc/python3.11/html/_sources"

# Prose-heavy parts of the documentation (C API, distutils and the
# changelog-like "What's New" are left out).
SECTIONS = ("tutorial", "howto", "faq", "reference", "library", "extending",
            "using", "installing")
TOP_FILES = ("glossary.rst.txt",)

VOCAB_SIZE = 2000
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
DOC_TARGET_CHARS = 3000  # a document is "a few paragraphs"
MIN_DOC_CHARS = 300
VALIDATION_MODULUS = 20  # 1 in 20 documents held out (~5 %)

# Directives whose body is prose worth keeping (the directive line itself is
# dropped, the indented body is kept).
KEEP_BODY = {
    "note", "warning", "versionadded", "versionchanged", "deprecated",
    "deprecated-removed", "seealso", "important", "tip", "impl-detail",
    "attention", "caution", "hint", "admonition", "topic", "sidebar",
    "function", "class", "method", "attribute", "data", "exception",
    "classmethod", "staticmethod", "decorator", "decoratormethod",
    "coroutinefunction", "coroutinemethod", "abstractmethod", "describe",
    "option", "cmdoption", "envvar", "opcode", "pdbcommand", "module",
    "glossary", "rubric", "centered", "availability", "audit-event",
}

ROLE_RE = re.compile(r":[a-zA-Z:+-]+:`([^`]*)`")
TITLE_TARGET_RE = re.compile(r"^(.*?)\s*<[^<>]*>$", re.S)
HEADING_RE = re.compile(r"^([=\-~^*#\"'`+.:_])\1{2,}\s*$")
TABLE_RE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+|[-=]{3,}( +[-=]{3,})+)\s*$")


def _role(m: re.Match) -> str:
    text = m.group(1)
    t = TITLE_TARGET_RE.match(text)
    if t and t.group(1):
        text = t.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].split(".")[-1]
    return text


def inline(text: str) -> str:
    """Strip reST inline markup from one paragraph of text."""
    text = ROLE_RE.sub(_role, text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"`([^`<]+?)\s*<[^`>]*>`__?", r"\1", text)  # `title <url>`_
    text = re.sub(r"`([^`]+)`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\[#\w*\]_", "", text)
    text = re.sub(r"\b(\w+)__?(?=[\s.,;:)]|$)", r"\1", text)
    text = text.replace("|version|", "3.11").replace("|release|", "3.11")
    text = text.replace("\\ ", "").replace("\\", "")
    return re.sub(r"[ \t]+", " ", text).strip()


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_paragraphs(src: str) -> list[str]:
    """Very small reST -> plain prose converter (drops code, tables, directives)."""
    lines = src.expandtabs(8).splitlines()
    out: list[str] = []  # cleaned lines, blank lines separate paragraphs
    i, n = 0, len(lines)
    skip_indent = None  # drop lines indented deeper than this
    while i < n:
        line = lines[i].rstrip()
        ind = indent_of(line)
        if skip_indent is not None:
            if not line.strip() or ind > skip_indent:
                i += 1
                continue
            skip_indent = None
        stripped = line.strip()
        if not stripped:
            out.append("")
            i += 1
            continue
        if stripped.startswith(".. "):
            m = re.match(r"\.\.\s+([\w:-]+)::", stripped)
            if m and m.group(1).split(":")[-1] in KEEP_BODY:
                name = m.group(1).split(":")[-1]
                # drop the directive line and its option lines (":opt: x")
                i += 1
                while i < n and lines[i].strip().startswith(":") and indent_of(lines[i]) > ind \
                        and not lines[i].strip().startswith(":ref:"):
                    i += 1
                if name == "rubric" or name == "centered":
                    out.append(inline(stripped.split("::", 1)[1]))
                continue
            skip_indent = ind  # comment, target, code-block, index, toctree, ...
            i += 1
            continue
        if HEADING_RE.match(stripped) or TABLE_RE.match(line):
            out.append("")
            i += 1
            continue
        if stripped.startswith((">>>", "...", "|", "+", "$ ")):
            # doctest / line blocks / table rows / shell sessions
            skip_indent = ind - 1
            i += 1
            continue
        if stripped == "::":
            skip_indent = ind
            i += 1
            continue
        if stripped.endswith("::"):
            out.append(line[:-1])  # "For example::" -> "For example:"
            skip_indent = ind
            i += 1
            continue
        out.append(line)
        i += 1

    # Join wrapped lines into paragraphs; list items start new lines.
    paras: list[str] = []
    cur: list[str] = []

    def flush():
        if cur:
            text = inline(" ".join(cur))
            if text:
                paras.append(text)
            cur.clear()

    for line in out:
        s = line.strip()
        if not s:
            flush()
            continue
        if re.match(r"^([*\-]|#\.|\d+\.)\s+", s):
            flush()
            s = "- " + re.sub(r"^([*\-]|#\.|\d+\.)\s+", "", s)
        cur.append(s)
    flush()

    keep = []
    for p in paras:
        words = p.split()
        # drop fragments that are not prose (single identifiers, stray markup)
        if len(words) < 4 and not (keep and len(words) >= 1 and p[:1].isupper() and len(p) < 80):
            continue
        if sum(c.isalpha() for c in p) < 0.6 * len(p):
            continue
        keep.append(p)
    return keep


def chunk(paras: list[str]) -> list[str]:
    docs, cur, size = [], [], 0
    for p in paras:
        cur.append(p)
        size += len(p) + 2
        if size >= DOC_TARGET_CHARS:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n\n".join(cur)
        if docs and len(tail) < MIN_DOC_CHARS:
            docs[-1] += "\n\n" + tail
        else:
            docs.append(tail)
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


def source_files(root: Path) -> list[Path]:
    files = [root / f for f in TOP_FILES if (root / f).exists()]
    for sec in SECTIONS:
        files += sorted((root / sec).rglob("*.rst.txt"))
    return files


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw:
        # mtime=0 and no file name in the header -> byte-identical output
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            for d in docs:
                gz.write((json.dumps({"text": d}, ensure_ascii=False) + "\n").encode("utf-8"))


def build_corpus(root: Path) -> None:
    train, val = [], []
    for f in source_files(root):
        rel = f.relative_to(root).as_posix()
        docs = chunk(rst_to_paragraphs(f.read_text(encoding="utf-8")))
        for k, d in enumerate(docs):
            h = int(hashlib.sha256(f"{rel}#{k}".encode()).hexdigest(), 16)
            (val if h % VALIDATION_MODULUS == 0 else train).append(d)
    write_jsonl_gz(CORPUS_DIR / "train.jsonl.gz", train)
    write_jsonl_gz(CORPUS_DIR / "validation.jsonl.gz", val)
    for name, docs in (("train", train), ("validation", val)):
        print(f"{name}: {len(docs)} documents, {sum(len(d.encode()) for d in docs) / 1e6:.2f} MB of text")


def read_train_texts() -> list[str]:
    with gzip.open(CORPUS_DIR / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def build_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_train_texts(), trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    assert tok.get_vocab_size() <= VOCAB_SIZE < 2048
    TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKENIZER_DIR / "tokenizer.json"), pretty=True)
    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (TOKENIZER_DIR / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"tokenizer: vocab {tok.get_vocab_size()}, bos={tok.token_to_id(BOS)}, eos={tok.token_to_id(EOS)}")


def resolve_source(arg: str | None, tmp: str) -> Path:
    src = Path(arg) if arg else DEFAULT_SOURCE
    if src.is_file() and src.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(src), tmp], check=True)
        src = Path(tmp) / DEB_SOURCE_SUBDIR
    elif src.is_dir() and (src / DEB_SOURCE_SUBDIR).is_dir():
        src = src / DEB_SOURCE_SUBDIR  # an extracted .deb
    if not (src / "tutorial").is_dir():
        sys.exit(f"source not found at {src}: install or download the Debian package "
                 "python3.11-doc (see the top of this file), or use --tokenizer-only")
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", help="_sources dir, extracted .deb dir, or python3.11-doc .deb "
                    f"(default {DEFAULT_SOURCE})")
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="only retrain the tokenizer from the shipped corpus")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.tokenizer_only:
        with tempfile.TemporaryDirectory() as tmp:
            build_corpus(resolve_source(args.source, tmp))
    build_tokenizer()


if __name__ == "__main__":
    main()
