"""Kill a rank of a training job between two checkpoints; compare it with an uninterrupted run.

    python -m benchmarks.e2e.kill_resume --out DIR [--dump-root DUMPS] [--config CFG] [--ngpu 2]
        [--steps 12] [--interval 4] [--kill-after 6] [--kill-rank 1] [--tol 0] [--timeout 600]
        [-- more run_train.sh options]

Runs `./run_train.sh` twice with the same options and seed: into DUMPS/uninterrupted without
checkpoints, then into DUMPS/killed with a checkpoint every --interval steps and MAX_RESTARTS=1,
SIGKILLing rank --kill-rank as soon as rank 0 has logged step --kill-after (so inside the step
after it). torchrun restarts the group; the restarted job resumes from the last complete
checkpoint and finishes. Each job's output goes to DIR/<name>.log; DUMPS (the dump folders:
checkpoints, TensorBoard) defaults to DIR. Prints a row per step (the
two runs' losses) and, last, a table of checks: the restart happened and said its step; the
killed job's TensorBoard run is one folder that shows each step the uninterrupted run logged
once (the loss, grad_norm and, with --fused_ce.enable, each fused_ce/* tag); and those values
agree within --tol (absolute). --kill-after must be a log step (the kill waits for its line).
Exit code 0 when every check passes. tests/jobs/test_restart.py runs it on CPU; benchmarks/gpu_run.sh
(mode `resume`) on one GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_common import md_row, ROOT
from benchmarks.tb_events import event_files, EventsError, run_folder, scalar_series, shown_steps
from parallel.metrics import (ENTROPY_TAG, LOSS_TAG, LSE_MEAN_TAG, TOKEN_ACCURACY_TAG,
                              Z_LOSS_TAG)

FUSED_TAGS = (LSE_MEAN_TAG, Z_LOSS_TAG, TOKEN_ACCURACY_TAG, ENTROPY_TAG)
RESUMED = re.compile(r"\[checkpoint\] resumed from step (\d+)")


@dataclass
class Job:
    returncode: int
    output: str
    seconds: float
    killed_pid: int | None = None
    killed_at: float | None = None  # seconds after the start


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the training process of global `rank` started by the launcher (torchrun sets RANK)."""
    for pid in _descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def run_job(dump: Path, args: list[str], env: dict, log: Path, timeout: float,
            kill_after: int | None = None, kill_rank: int = 0) -> Job:
    """./run_train.sh into `dump`; with `kill_after`, SIGKILL rank `kill_rank` once rank 0 has
    logged that step (once: the restarted job runs to the end)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        ["./run_train.sh", "--job.dump_folder", str(dump), *args], cwd=ROOT,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # the timeout below ends the launcher and every rank
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    job = Job(returncode=0, output="", seconds=0.0)
    step_line = re.compile(rf"\[rank0\]:.*\bstep:\s+{kill_after}\s+loss") if kill_after else None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if step_line is not None and job.killed_pid is None and step_line.search(_plain(line)):
                pid = rank_pid(proc.pid, kill_rank)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    job.killed_pid, job.killed_at = pid, time.monotonic() - start
                    lines.append(f"=== kill_resume: SIGKILL to rank {kill_rank} (pid {pid}) after step "
                                 f"{kill_after}\n")
        job.returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted here (SIGTERM: see main): no rank outlives it
            os.killpg(proc.pid, signal.SIGKILL)
    job.output, job.seconds = "".join(lines), time.monotonic() - start
    log.write_text(job.output)
    return job


@dataclass
class Comparison:
    rows: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    seconds: tuple[float, float] = (0.0, 0.0)  # the uninterrupted job's, the killed job's

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)


def compare(reference: Path, killed: Path, killed_job: Job, tol: float, fused: bool,
            kill_after: int, interval: int) -> Comparison:
    """The checks of the module docstring; every tag's values over the steps both runs logged."""
    cmp = Comparison()
    resumed = [int(m) for m in RESUMED.findall(_plain(killed_job.output))]
    last_checkpoint = kill_after // interval * interval
    cmp.checks.append(("restarted after the kill, resumed from the last complete checkpoint",
                       killed_job.killed_pid is not None and killed_job.returncode == 0
                       and resumed == [last_checkpoint],
                       f"kill at {killed_job.killed_at or 0:.0f} s, exit {killed_job.returncode}, "
                       f"resumed from step {', '.join(map(str, resumed)) or 'none'} "
                       f"(expected {last_checkpoint})"))
    tags = [LOSS_TAG, "grad_norm", *(FUSED_TAGS if fused else ())]
    ref = {tag: dict(scalar_series(reference / "tb", tag)) for tag in tags}
    try:
        folder = run_folder(killed / "tb")
        got = {tag: dict(scalar_series(folder, tag)) for tag in tags}
    except EventsError as e:
        cmp.checks.append(("TensorBoard: the logged steps once each, in one folder", False,
                           str(e).splitlines()[0]))
        return cmp
    cmp.rows = [(step, value, got[LOSS_TAG].get(step)) for step, value in sorted(ref[LOSS_TAG].items())]
    wrong = {tag: shown for tag in tags if (shown := shown_steps(folder, tag)) != sorted(ref[tag])}
    cmp.checks.append(("TensorBoard: the logged steps once each, in one folder", not wrong,
                       f"{len(event_files(folder))} event files in {Path(folder).name}; "
                       + ("; ".join(f"{t}: steps {s}" for t, s in wrong.items())
                          or f"{len(tags)} tags x the {len(ref[LOSS_TAG])} steps the uninterrupted run logged")))
    diffs = {tag: max((abs(v - got[tag][s]) for s, v in ref[tag].items() if s in got[tag]), default=0.0)
             for tag in tags}
    worst = max(diffs, key=diffs.get)
    cmp.checks.append((f"every logged value equal to the uninterrupted run's (abs diff <= {tol:g})",
                       not wrong and diffs[worst] <= tol,
                       f"largest: {diffs[worst]:.3g} ({worst}); {', '.join(tags)}"))
    return cmp


def report(cmp: Comparison) -> str:
    lines = [md_row(["step", "uninterrupted loss", "killed + resumed loss", "abs diff"]),
             md_row(["---"] * 4)]
    for step, a, b in cmp.rows:
        diff = f"{abs(a - b):.3g}" if a is not None and b is not None else "missing"
        lines.append(md_row([str(step), f"{a:.6f}" if a is not None else "missing",
                             f"{b:.6f}" if b is not None else "missing", diff]))
    lines += ["", md_row(["check", "result", "detail"]), md_row(["---"] * 3)]
    lines += [md_row([name, "PASS" if passed else "FAIL", detail]) for name, passed, detail in cmp.checks]
    lines.append(md_row(["wall time (launch to exit)", "", f"uninterrupted {cmp.seconds[0]:.0f} s, "
                                                            f"killed + restarted {cmp.seconds[1]:.0f} s"]))
    return "\n".join(lines)


def run(out: Path, config: str, ngpu: int, steps: int, interval: int, kill_after: int,
        kill_rank: int, tol: float, extra: list[str], timeout: float, dump_root: Path | None = None) -> Comparison:
    if not interval <= kill_after < steps or kill_after % interval == 0:
        raise ValueError(f"--kill-after {kill_after} must fall between two checkpoints "
                         f"(every --interval {interval} steps) before the last step {steps}")
    out.mkdir(parents=True, exist_ok=True)
    dumps = dump_root or out
    for name in ("uninterrupted", "killed"):
        shutil.rmtree(dumps / name, ignore_errors=True)  # an old checkpoint there would be resumed
    env = {"NGPU": str(ngpu), "CONFIG_FILE": str(Path(config).resolve())}
    args = ["--training.steps", str(steps), *extra]
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", str(interval)]
    reference = run_job(dumps / "uninterrupted", [*args, "--checkpoint.no-enable"], env,
                        out / "uninterrupted.log", timeout)
    if reference.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {reference.returncode}): "
                           f"{out / 'uninterrupted.log'}\n{reference.output[-3000:]}")
    killed = run_job(dumps / "killed", [*args, *ckpt], {**env, "MAX_RESTARTS": "1"}, out / "killed.log",
                     timeout, kill_after=kill_after, kill_rank=kill_rank)
    cmp = compare(dumps / "uninterrupted", dumps / "killed", killed, tol, "--fused_ce.enable" in extra,
                  kill_after, interval)
    cmp.seconds = (reference.seconds, killed.seconds)
    return cmp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the two jobs' logs")
    p.add_argument("--dump-root", type=Path, help="their dump folders (default: --out)")
    p.add_argument("--config", default=os.path.join(ROOT, "train_configs", "debug_model.toml"))
    p.add_argument("--ngpu", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--kill-after", type=int, default=6)
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    p.add_argument("extra", nargs="*", help="more run_train.sh options (after --)")
    opts = p.parse_args(argv)
    # a timeout's SIGTERM unwinds run_job, which then ends the job's ranks (their own session)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cmp = run(opts.out, opts.config, opts.ngpu, opts.steps, opts.interval, opts.kill_after,
              opts.kill_rank, opts.tol, opts.extra, opts.timeout, opts.dump_root)
    print(report(cmp))
    return 0 if cmp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
