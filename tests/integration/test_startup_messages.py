"""What a job says at start-up: one line on the device, backend, world and layout; one on the fused
head (on: what it does; off: that it is off), a warning naming any `[fused_ce]` setting that does
nothing because the head is off, and a hint for 16-bit training on a CPU."""

import ast
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from torchtitan.config import ConfigManager

from parallel import config as fused_ce_config
from parallel.config import FusedCE
from parallel.log_tidying import _LogText
from parallel.fused_head import FusedLMHead
from parallel.train import check_job, cpu_precision_hint, describe_head, describe_job


def parse(*args: str):
    return ConfigManager().parse_args(["--job.custom_config_module=parallel.config", "--job.config_file",
                                       str(ROOT / "train_configs" / "debug_model.toml"), *args])


def test_settings_ignored_while_off_are_named(caplog):
    with caplog.at_level(logging.WARNING):
        check_job(parse("--fused_ce.label_smoothing", "0.1", "--fused_ce.no-weight_grad_fp32"))
    warnings = [r.getMessage() for r in caplog.records if "[fused_ce]" in r.getMessage()]
    assert warnings == ["[fused_ce] enable is off, so label_smoothing=0.1, weight_grad_fp32=False do "
                        "nothing; turn the fused head on with --fused_ce.enable"]


@pytest.mark.parametrize("args", [(), ("--fused_ce.enable", "--fused_ce.label_smoothing", "0.1")])
def test_no_warning_when_nothing_is_ignored(args, caplog):
    with caplog.at_level(logging.WARNING):
        check_job(parse(*args))
    assert not [r for r in caplog.records if "[fused_ce]" in r.getMessage()]


def _dims(**kw):
    base = dict(fsdp_enabled=False, tp_enabled=False, pp_enabled=False, cp=1, tp=1, world_size=1,
                dp_replicate=1, dp_shard=1, pp=1, ep=1)
    return SimpleNamespace(**{**base, **kw})


def test_job_line_names_device_backend_world_layout_dtype_and_seed(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    job = parse("--training.mixed_precision_param", "bfloat16")
    line = describe_job(job, _dims(world_size=8, dp_shard=4, tp=2, tp_enabled=True, fsdp_enabled=True),
                        torch.device("cpu"))
    assert line == ("Job: world size 8 = 2 node(s) x 4 cpu process(es), gloo; dp_replicate=1, dp_shard=4, "
                    "cp=1, tp=2, pp=1, ep=1; bfloat16; seed 42")
    unseeded = describe_job(parse("--debug.seed", "None"), _dims(), torch.device("cpu"))
    assert unseeded.endswith("float32; no seed (debug.seed): runs are not reproducible")


def test_cpu_hint_for_16_bit_training():
    bf16 = parse("--training.mixed_precision_param", "bfloat16")
    hint = cpu_precision_hint(bf16, _dims(), torch.device("cpu"))
    assert hint.startswith("training in bfloat16 on the CPU: its 16-bit matmuls are many times slower")
    assert "--training.mixed_precision_param float32" in hint
    assert cpu_precision_hint(parse(), _dims(), torch.device("cpu")) is None  # the debug job: float32
    assert cpu_precision_hint(bf16, _dims(), torch.device("cuda")) is None
    assert cpu_precision_hint(bf16, _dims(tp_enabled=True), torch.device("cpu")) is None  # TP alone: fp32


def _filtered(msg: str, *args):
    record = logging.LogRecord("root", logging.INFO, __file__, 1, msg, args, None)
    return record.getMessage() if _LogText(cpu=True).filter(record) else None


def test_torchtitans_noise_is_gone():
    assert _filtered("torchtitan version: %s (0.0.0 means __version__ is not defined correctly).",
                     "0.2.2") == f"torchtitan 0.2.2, torch {torch.__version__}"
    assert _filtered("model.safetensors.index.json not found at hf_assets_path: x/model.safetensors.index.json."
                     "                     Defaulting to saving a single safetensors file") is None
    assert _filtered("HF assets path ./tests/assets/tokenizer does not exist!") is None
    assert _filtered("Training starts at step 1") == "Training starts at step 1"


def test_help_texts_are_one_line_each():
    """tyro keeps a docstring's line breaks: a broken line would break --help mid-phrase."""
    body = next(node for node in ast.parse(open(fused_ce_config.__file__).read()).body
                if isinstance(node, ast.ClassDef) and node.name == "FusedCE").body
    docs = [node.value.value for node in body if isinstance(node, ast.Expr)]
    assert len(docs) == len(FusedCE.__dataclass_fields__)
    assert all("\n" not in doc for doc in docs), [doc for doc in docs if "\n" in doc]


def _head(vocab=1000, dim=8, **cfg):
    return FusedLMHead(torch.nn.Linear(dim, vocab, bias=False), FusedCE(enable=True, **cfg))


def test_start_up_line_one_gpu_bf16():
    # 2 x 4096 tokens of bf16 logits over 100000 entries in a 512 MiB budget: 2684 rows per
    # chunk at most -> 4 balanced chunks of 2048 rows (multiples of 128), dW carried in fp32.
    job = parse("--fused_ce.enable", "--fused_ce.chunk_budget_mib", "512", "--fused_ce.z_loss", "1e-4",
                "--training.seq_len", "4096", "--training.mixed_precision_param", "bfloat16")
    line = describe_head(job, _head(vocab=100_000), _dims(fsdp_enabled=True))
    assert line == ("[fused_ce] on: backend torch (vendor path: statistics from the vendor GEMM's logits in the inputs' dtype); 4 chunk(s) of 2048 of 8192 tokens per micro-batch "
                    "(chunk_budget_mib=512 of bfloat16 logits); dW carried across chunks in fp32; "
                    "vocab rows [0, 100000) of 100000 on this rank; options: z_loss=0.0001")


def test_start_up_line_says_when_one_chunk_exceeds_the_cap():
    # 8192 tokens, a 1 MiB cap on bf16 logits of 1000 entries: 16 chunks of 512 rows plus the
    # fp32 dW carry (1000 x 8192 x 2 B) hold more than one chunk of 8192 rows without it
    job = parse("--fused_ce.enable", "--fused_ce.chunk_budget_mib", "1", "--training.seq_len", "4096",
                "--training.mixed_precision_param", "bfloat16")
    line = describe_head(job, _head(vocab=1000, dim=8192), _dims(fsdp_enabled=True))
    assert ("1 chunk(s) of 8192 of 8192 tokens per micro-batch (chunk_budget_mib=1 of bfloat16 logits, a "
            "cap: larger chunks above it hold no more memory in all than capped chunks); dW in bfloat16 "
            "(no carry: one chunk or fp32)") in line


def test_start_up_line_fp32_one_chunk():
    job = parse("--fused_ce.enable", "--fused_ce.no-check_labels")
    line = describe_head(job, _head(), _dims())
    assert "1 chunk(s) of 512 of 512 tokens per micro-batch (chunk_budget_mib=1024 of float32 logits)" in line
    assert "dW in float32 (no carry: one chunk or fp32)" in line
    assert line.endswith("options: check_labels=False")


def test_start_up_line_tp_alone_is_fp32_and_names_the_slice():
    job = parse("--fused_ce.enable", "--fused_ce.chunk_size", "100", "--fused_ce.no-weight_grad_fp32",
                "--training.mixed_precision_param", "bfloat16")
    head = _head(vocab=11)
    head.vocab_slice = lambda: (6, 5, 11)  # rank 1 of an uneven TP=2 split
    line = describe_head(job, head, _dims(tp_enabled=True, tp=2, cp=1))
    assert "6 chunk(s) of 100 of 512 tokens per micro-batch (chunk_size=100)" in line
    assert "dW in float32 (no carry: one chunk or fp32)" in line  # TP alone trains in fp32
    assert "vocab rows [6, 11) of 11 on this rank (TP=2)" in line


def test_start_up_line_names_the_fp32_statistics_path():
    # bf16 on the torch backend: the fp32 product (the option, off by default, is listed)
    job = parse("--fused_ce.enable", "--fused_ce.fp32_statistics",
                "--training.mixed_precision_param", "bfloat16")
    line = describe_head(job, _head(), _dims(fsdp_enabled=True))
    assert line.startswith("[fused_ce] on: backend torch (fp32 path: statistics from the fp32 "
                           "product); ")
    assert line.endswith("options: fp32_statistics=True")
