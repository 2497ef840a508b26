"""Shared helpers: launch run_train.sh jobs and read their per-step metrics."""

import glob
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's own tl.* helpers are jitted when triton is first imported (torchtitan imports
    # it below): the interpreter must be chosen before that, or interpreted kernels fail.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from parallel import platform  # noqa: E402

platform.apply()  # tests import torchtitan in-process too; on CPU it must be patched first

ROOT = Path(__file__).resolve().parents[1]

# Small and fast on 2 CPU cores; every job logs every step to TensorBoard.
FAST = (
    "--training.seq_len", "128", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
    "--validation.seq_len", "128", "--validation.local_batch_size", "2",
)


def run_train(dump: Path, *args: str, env: dict | None = None, timeout: int = 300, check: bool = True):
    """Run ./run_train.sh with the debug config (plus `args`); returns (CompletedProcess, seconds)."""
    start = time.monotonic()
    proc = subprocess.run(
        ["./run_train.sh", "--job.dump_folder", str(dump), *args],
        cwd=ROOT,
        env={**os.environ, "NGPU": "1", "LOG_RANK": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - start
    if check and proc.returncode != 0:
        pytest.fail(f"run_train.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc, seconds


def scalars(dump: Path, tag: str, tb_folder: str = "tb") -> dict[int, float]:
    """{step: value} of one TensorBoard tag written by rank 0 of the job in `dump`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(glob.glob(str(dump / tb_folder / "*")))
    assert len(runs) == 1, f"expected one TensorBoard run in {dump / tb_folder}, found {runs}"
    acc = EventAccumulator(runs[0], size_guidance={"scalars": 0})
    acc.Reload()
    return {event.step: event.value for event in acc.Scalars(tag)}


def losses(dump: Path, tb_folder: str = "tb") -> dict[int, float]:
    return scalars(dump, "loss_metrics/global_avg_loss", tb_folder)


def assert_close(a: dict[int, float], b: dict[int, float], rel: float, steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=rel), f"step {step}: {a[step]} vs {b[step]}"
