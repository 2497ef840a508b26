"""A CPU run says what it does and nothing that misleads.

Before: NCCL environment warnings, lspci warnings, "fallback to A100" and an MFU measured
against an A100's peak, gloo set_timeout warnings, an autocast warning, ANSI colour codes in
piped logs, dataset progress bars inside log lines, "debugmodelwith {", torchrun's
OMP_NUM_THREADS banner and torchdata's set_vital deprecation. run_train.sh's environment and
parallel/log_tidying.py and parallel/cpu_shims.py remove them; the MFU reads "n/a" on CPU and is not logged to TensorBoard.
"""

import glob
import subprocess

import pytest

from conftest import FAST, ROOT, run_train

NOISE = [
    "TORCH_NCCL", "will be overridden",   # NCCL environment
    "lspci", "A100",                      # peak FLOPS lookup
    "Set timeout is now only supported",  # gloo set_timeout
    "autocast",                           # CPU autocast refusing float32
    "\x1b[",                              # colour codes in a pipe
    "examples/s",                         # datasets' progress bars
    "debugmodelwith",                     # torchtitan's missing space
    "OMP_NUM_THREADS",                    # torchrun's banner
    "set_vital",                          # torchdata's deprecation warning
    "0.0.0 means",                        # torchtitan's note on its own version string
    "safetensors.index.json",             # torchtitan's warning for every tokenizer-only assets folder
]


@pytest.mark.slow
@pytest.mark.parametrize("ngpu", ["1", "2"], ids=["one-process-amp", "fsdp2"])
def test_cpu_run_output_has_no_noise(tmp_path, ngpu):
    # One process: the autocast path; FSDP=2: gloo sub-groups; a fresh datasets cache: progress bars.
    proc, _ = run_train(
        tmp_path / "dump", *FAST, "--training.steps", "2", "--validation.no-enable",
        env={"NGPU": ngpu, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")},
    )
    output = proc.stdout + proc.stderr
    found = [noise for noise in NOISE if noise in output]
    assert not found, f"{found} in:\n{output[-8000:]}"
    assert "Building llama3 debugmodel with {" in output
    assert "mfu: n/a" in output and "MFU: n/a on CPU" in output
    assert f"Job: world size {ngpu} = 1 node(s) x {ngpu} cpu process(es), gloo;" in output
    assert output.count("[fused_ce] off: the model's own LM head and cross-entropy") == int(ngpu)  # once per rank

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = glob.glob(str(tmp_path / "dump" / "tb" / "*"))
    acc = EventAccumulator(run)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss_metrics/global_avg_loss" in tags and "mfu(%)" not in tags


def test_help_shows_the_fused_options_first():
    proc = subprocess.run(["./run_train.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: run_train.sh")
    first_screen = "\n".join(lines[:45])
    from parallel.config import FusedCE

    for name in FusedCE.__dataclass_fields__:
        flag = f"--fused-ce.{name.replace('_', '-')}"
        assert flag in first_screen, flag
    assert any("--job.config-file" in line for line in lines)  # then torchtitan's own
    assert not any(line.startswith("[rank") for line in lines)  # one process, not torchrun
