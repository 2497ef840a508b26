"""Soak: a long fused run must never produce NaN and its memory must stay flat after warm-up.

    python -m benchmarks.e2e.soak --steps 1000 --config train_configs/llama3_1b.toml -- --training.seq_len 1024
    python -m benchmarks.e2e.soak --steps 12 --config train_configs/debug_model.toml --log-freq 1 \
        --memory-tag 'memory/cpu_rss_peak(GiB)' --tolerance 0.2 --no-append          # CPU check

Runs ./run_train.sh with --fused_ce.enable (plus the arguments after --), reads the job's
TensorBoard events and checks: every logged loss is finite, and memory/max_active(GiB) after
the warm-up (the first 10% of logged steps) stays within --tolerance (default 1%) of its
median. Prints a table and appends it to benchmarks/log/results.md. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_common import RESULTS_LOG, ROOT, emit, header
from benchmarks.tb_events import EventsError, scalar_series

from parallel.metrics import LOSS_TAG, MAX_ACTIVE_TAG


def read_scalars(dump: Path, tag: str) -> list[tuple[int, float]]:
    """The job's one TensorBoard run under <dump>/tb (exit with the reason if there is not one)."""
    try:
        return scalar_series(dump / "tb", tag)
    except EventsError as e:
        raise SystemExit(f"soak: {e}") from e


def verdict(losses: list[float], memory: list[float], tolerance: float):
    """(all losses finite, steady-state median, largest relative deviation from it, flat?)."""
    finite = all(math.isfinite(x) for x in losses)
    steady = sorted(memory[max(1, len(memory) // 10):])
    median = steady[len(steady) // 2]
    worst = max(abs(x - median) / median for x in steady)
    return finite, median, worst, worst <= tolerance


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--config", default="train_configs/llama3_1b.toml")
    p.add_argument("--log-freq", type=int, default=10)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--memory-tag", default=MAX_ACTIVE_TAG, help="CPU runs: memory/cpu_rss_peak(GiB)")
    p.add_argument("--dump", default="outputs/soak")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--results", default=RESULTS_LOG)
    p.add_argument("extra", nargs="*", help="arguments for run_train.sh (after --)")
    args = p.parse_args()

    dump = Path(args.dump).resolve()
    cmd = ["./run_train.sh", "--fused_ce.enable", "--training.steps", str(args.steps),
           "--metrics.log_freq", str(args.log_freq), "--job.dump_folder", str(dump), *args.extra]
    env = {**os.environ, "CONFIG_FILE": args.config, "NGPU": os.environ.get("NGPU", "1")}
    print("soak:", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    losses = [v for _, v in read_scalars(dump, LOSS_TAG)]
    memory = [v for _, v in read_scalars(dump, args.memory_tag)]
    finite, median, worst, flat = verdict(losses, memory, args.tolerance)
    ok = rc == 0 and finite and flat
    table = "\n".join([
        "| steps | run rc | logged points | losses finite | first / last loss | "
        f"{args.memory_tag} median after warm-up | max deviation | flat (tol) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.steps} | {rc} | {len(losses)} | {finite} | {losses[0]:.4f} / {losses[-1]:.4f} | "
        f"{median:.3f} | {worst:.2%} | {flat} ({args.tolerance:.0%}) |",
    ])
    notes = [f"- config {args.config}; NGPU {env['NGPU']}; run_train.sh arguments `{' '.join(cmd[1:])}`"]
    emit(header(f"Soak: fused head, {args.steps} steps", notes=notes) + table, args.results, not args.no_append)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
