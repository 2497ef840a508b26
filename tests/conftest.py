"""Shared helpers: launch run_train.sh jobs and read their per-step metrics."""

import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's own tl.* helpers are jitted when triton is first imported (torchtitan imports
    # it below): the interpreter must be chosen before that, or interpreted kernels fail.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from parallel import patches  # noqa: E402

patches.apply()  # tests import torchtitan in-process too; on CPU it must be patched first

ROOT = Path(__file__).resolve().parents[1]

# Small and fast on 2 CPU cores; every job logs every step to TensorBoard.
FAST = (
    "--training.seq_len", "128", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
    "--validation.seq_len", "128", "--validation.local_batch_size", "2",
)


def run_train(dump: Path, *args: str, env: dict | None = None, timeout: int = 300, check: bool = True):
    """Run ./run_train.sh with the debug config (plus `args`); returns (CompletedProcess, seconds).

    Every rank's output is kept (LOG_RANK lists them all), so a failure on any rank shows.
    A job that logged its last step and then had a rank abort (SIGABRT) while tearing down is
    run once more, with a warning (parallel.train skips the CPU teardown where that abort was
    seen; this guards what remains of it); a rerun that fails fails.
    """
    env = {"NGPU": "1", **(env or {})}
    ranks = ",".join(str(r) for r in range(int(env["NGPU"])))
    start = time.monotonic()
    for attempt in range(2):
        proc = subprocess.run(
            ["./run_train.sh", "--job.dump_folder", str(dump), *args],
            cwd=ROOT,
            env={**os.environ, "LOG_RANK": ranks, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not (attempt == 0 and proc.returncode != 0 and _aborted_after_last_step(proc, args)):
            break
        warnings.warn(f"run_train.sh {' '.join(args)}: a rank aborted after the run finished; rerun")
        shutil.rmtree(dump, ignore_errors=True)
    seconds = time.monotonic() - start
    if check and proc.returncode != 0:
        pytest.fail(f"run_train.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc, seconds


def _aborted_after_last_step(proc, args) -> bool:
    if "--training.steps" not in args:
        return False
    last = args[args.index("--training.steps") + 1]
    output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    return "SIGABRT" in output and re.search(rf"\bstep:\s+{last}\s+loss", output) is not None


def scalars(dump: Path, tag: str, tb_folder: str = "tb") -> dict[int, float]:
    """{step: value} of one TensorBoard tag written by rank 0 of the job in `dump` (its one run)."""
    from benchmarks.tb_events import scalar_series  # the repository's one event reader

    return dict(scalar_series(dump / tb_folder, tag))


def losses(dump: Path, tb_folder: str = "tb") -> dict[int, float]:
    return scalars(dump, "loss_metrics/global_avg_loss", tb_folder)


def assert_close(a: dict[int, float], b: dict[int, float], rel: float, steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=rel), f"step {step}: {a[step]} vs {b[step]}"
