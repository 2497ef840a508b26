"""A torchtitan user's own TOML runs with `--fused_ce.enable` added and nothing else.

The fixtures (tests/assets/torchtitan_configs) are torchtitan 0.2.2's own debug TOMLs, unchanged:
they name torchtitan's test assets relative to a torchtitan checkout (`dataset = "c4_test"`,
`hf_assets_path = "./tests/assets/tokenizer"`). Run from any other directory, the embedded copies
stand in, said once at start-up; a working directory that has them is read as torchtitan reads it.
Relative paths start at the working directory; what cannot be read is refused, naming the setting.
"""

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torchtitan.config import ConfigManager
from torchtitan.hf_datasets.text_datasets import DATASETS

from conftest import ROOT
from parallel import embedded_data
from parallel.train import check_job, JobRefused

FIXTURES = ROOT / "tests" / "assets" / "torchtitan_configs"
FAMILIES = sorted(p.stem for p in FIXTURES.glob("*.toml"))


def parse(toml: Path, *args: str):
    return ConfigManager().parse_args(["--job.custom_config_module=parallel.config", "--job.config_file",
                                       str(toml), *args])


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the checkout, offline as run_train.sh makes it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(embedded_data.datasets.config, "HF_HUB_OFFLINE", True)
    yield tmp_path
    embedded_data.DATASETS["c4_test"] = embedded_data._TORCHTITAN_C4_TEST  # as torchtitan registers it


def test_every_family_has_a_fixture():
    from parallel.specs import FAMILIES as SERVED

    assert FAMILIES == sorted(SERVED)
    for family in FAMILIES:
        text = (FIXTURES / f"{family}.toml").read_text()
        assert 'dataset = "c4_test"' in text and 'hf_assets_path = "./tests/assets/tokenizer"' in text


@pytest.mark.parametrize("family", FAMILIES)
def test_torchtitan_toml_passes_from_elsewhere(family, elsewhere, caplog):
    job = parse(FIXTURES / f"{family}.toml", "--fused_ce.enable")
    with caplog.at_level(logging.INFO):
        check_job(job)
    notes = [r.getMessage() for r in caplog.records if "stands in" in r.getMessage()]
    assert len(notes) == 2, notes  # the tokenizer and the data set, once each
    assert notes[0].startswith(f"model.hf_assets_path='./tests/assets/tokenizer': {elsewhere} has no such folder")
    assert notes[1].startswith(f"training.dataset='c4_test': {elsewhere} has no tests/assets/c4_test")
    assert job.model.hf_assets_path == str(embedded_data.TOKENIZER)
    assert DATASETS["c4_test"].path == str(embedded_data.CORPUS / "train.jsonl.gz")


def test_a_torchtitan_checkout_is_read_as_torchtitan_reads_it(elsewhere, caplog):
    (elsewhere / "tests" / "assets" / "c4_test").mkdir(parents=True)
    shutil.copytree(embedded_data.TOKENIZER, elsewhere / "tests" / "assets" / "tokenizer")
    job = parse(FIXTURES / "qwen3.toml", "--fused_ce.enable")
    with caplog.at_level(logging.INFO):
        check_job(job)
    assert not [r for r in caplog.records if "stands in" in r.getMessage()]
    assert job.model.hf_assets_path == "./tests/assets/tokenizer"
    assert DATASETS["c4_test"].path == "tests/assets/c4_test"


def test_relative_paths_start_at_the_working_directory(elsewhere, monkeypatch):
    shutil.copytree(embedded_data.TOKENIZER, elsewhere / "my_tokenizer")
    (elsewhere / "my_data").mkdir()
    args = ("--model.hf_assets_path", "my_tokenizer", "--training.dataset_path", "my_data")
    check_job(parse(FIXTURES / "deepseek_v3.toml", *args))
    sub = elsewhere / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)  # the same job from another directory: neither path is there
    with pytest.raises(JobRefused, match=rf"^model.hf_assets_path='my_tokenizer' is not a folder \(relative "
                                         rf"paths start at {sub}\): point it at the folder"):
        check_job(parse(FIXTURES / "deepseek_v3.toml", *args))
    with pytest.raises(JobRefused, match=rf"^training.dataset_path='my_data' is not a local file or folder "
                                         rf"\(relative paths start at {sub}\), and this run is offline"):
        check_job(parse(FIXTURES / "deepseek_v3.toml", "--training.dataset_path", "my_data"))


@pytest.mark.parametrize("args, message", [
    (("--training.dataset", "c4"),
     "training.dataset='c4' reads allenai/c4 from the Hugging Face Hub, and this run is offline "
     "(HF_HUB_OFFLINE=1, run_train.sh's default): point training.dataset_path at a local copy, or go "
     "online with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0"),
    (("--validation.enable",),  # the llama3 TOML validates on c4_validation (the Hub) once enabled
     "validation.dataset='c4_validation' reads allenai/c4 from the Hugging Face Hub, and this run is offline"),
    (("--training.dataset", "my_corpus"),
     "training.dataset='my_corpus' is not a known dataset (known: c4, c4_test, c4_validation, embedded, "
     "embedded_validation); register yours through experimental.custom_import"),
], ids=["c4-offline", "validation-offline", "unknown"])
def test_unreadable_data_is_refused(args, message, elsewhere):
    with pytest.raises(JobRefused) as refused:
        check_job(parse(FIXTURES / "llama3.toml", *args))
    assert str(refused.value).startswith(message), refused.value


def test_the_hub_online_is_left_to_torchtitan(elsewhere, monkeypatch):
    monkeypatch.setattr(embedded_data.datasets.config, "HF_HUB_OFFLINE", False)
    check_job(parse(FIXTURES / "llama3.toml", "--training.dataset", "c4", "--validation.enable"))


@pytest.mark.slow
@pytest.mark.parametrize("family, smaller", [
    # qwen3's debugmodel_moe (316M parameters, its experts a loop on CPU) takes minutes per step
    # on 2 cores; its dense debug flavor reads the same assets.
    ("qwen3", ("--model.flavor", "debugmodel")),
    ("deepseek_v3", ()),
])
def test_torchtitan_toml_trains_from_elsewhere(family, smaller, tmp_path):
    """run_train.sh from a directory outside the checkout: the TOML unchanged, its size cut on the CLI."""
    proc = subprocess.run(
        [str(ROOT / "run_train.sh"), "--fused_ce.enable", "--training.steps", "1", "--training.seq_len", "64",
         "--training.local_batch_size", "1", "--training.mixed_precision_param", "float32", *smaller],
        cwd=tmp_path, env={**os.environ, "CONFIG_FILE": str(FIXTURES / f"{family}.toml")},
        capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert output.count("stands in") == 2, output[-6000:]
    assert "[fused_ce] on: backend torch" in output and "step:  1  loss:" in output
    assert (tmp_path / "outputs").is_dir()  # dump_folder = "./outputs": where the command ran


def test_a_missing_config_file_is_named(tmp_path):
    proc = subprocess.run([str(ROOT / "run_train.sh"), "--fused_ce.enable"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CONFIG_FILE": "no/such.toml"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"run_train.sh: CONFIG_FILE=no/such.toml: no such file (relative paths start at {tmp_path})\n"
