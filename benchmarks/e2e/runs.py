"""The run machinery of the end-to-end benchmark (benchmarks.e2e.bench), shared by its modes
(cases, max-seq, search): one ``./run_train.sh`` job run and its log kept (``run_job`` ->
``RunResult``), torchtitan's per-step metric line parsed, the loss difference of two runs, the
arguments every run gets and the results block's header.

The per-step line comes from torchtitan 0.2.2 components/metrics.py (MetricsProcessor.log):
    f"{color.red}step: {step:2}  {color.green}loss: {global_avg_loss:8.5f}  "
    f"{color.orange}grad_norm: {grad_norm:7.4f}  "
    f"{color.turquoise}memory: {max_reserved_gib:5.2f}GiB({max_reserved_pct:.2f}%)  "
    f"{color.blue}tps: {round(tps):,}  {color.cyan}tflops: {tflops:,.2f}  "
    f"{color.magenta}mfu: {mfu:.2f}%{color.reset}"
behind the logger prefix "[titan] <asctime> - root - INFO - ", and behind "[rank0]:" when
torchrun tees with --local-ranks-filter.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field

from benchmarks import bench_common
from benchmarks.bench_common import ROOT

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STEP_RE = re.compile(
    r"(?:\[rank(?P<rank>\d+)\]:)?.*?(?<!validate )\bstep:\s*(?P<step>\d+)\s+"
    r"loss:\s*(?P<loss>[-+0-9.eE]+|nan|inf|-inf)\s+"
    r"grad_norm:\s*(?P<grad_norm>[-+0-9.eE]+|nan|inf|-inf)\s+"
    r"memory:\s*(?P<mem>[0-9.]+)GiB\((?P<mem_pct>[0-9.]+)%\)\s+"
    r"tps:\s*(?P<tps>[0-9,]+)"
    r"(?:\s+tflops:\s*(?P<tflops>[0-9,.]+))?"
    r"(?:\s+mfu:\s*(?P<mfu>[0-9.]+)%)?"
)
RANK_PREFIX_RE = re.compile(r"^\s*\[(?:default)?(?P<rank>\d+)\]:|^\s*\[rank(?P<rank2>\d+)\]:")
# torchtitan's DeviceMemoryMonitor warns "N CUDA memory allocation retries." (a cumulative count):
# the caching allocator hit its limit and freed its cache to retry. None: the cap never bound.
RETRIES_RE = re.compile(r"(\d+) \w+ memory allocation retries")
OOM_PATTERNS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory", "torch.OutOfMemoryError")


# --------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------
@dataclass
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    mem_gib: float
    mem_pct: float
    tps: float
    tflops: float | None = None
    mfu: float | None = None
    rank: int | None = None


def parse_line(line: str) -> StepMetrics | None:
    s = ANSI_RE.sub("", line)
    if "step:" not in s or "validate step:" in s:
        return None
    m = STEP_RE.search(s)
    if not m:
        return None
    rank = m.group("rank")
    if rank is None:
        pm = RANK_PREFIX_RE.match(s)
        if pm:
            rank = pm.group("rank") or pm.group("rank2")

    def num(x):
        return None if x is None else float(x.replace(",", ""))

    return StepMetrics(
        step=int(m.group("step")),
        loss=num(m.group("loss")),
        grad_norm=num(m.group("grad_norm")),
        mem_gib=num(m.group("mem")),
        mem_pct=num(m.group("mem_pct")),
        tps=num(m.group("tps")),
        tflops=num(m.group("tflops")),
        mfu=num(m.group("mfu")),
        rank=None if rank is None else int(rank),
    )


def parse_log(text: str) -> dict[int, StepMetrics]:
    """step -> metrics; where several ranks printed a step, the lowest rank wins."""
    out: dict[int, StepMetrics] = {}
    for line in text.splitlines():
        sm = parse_line(line)
        if sm is None:
            continue
        prev = out.get(sm.step)
        if prev is None or ((sm.rank or 0) < (prev.rank or 0)):
            out[sm.step] = sm
    return out


def alloc_retries(text: str) -> int:
    """The allocator's retries over the run (the largest cumulative count torchtitan warned)."""
    return max((int(m.group(1)) for m in RETRIES_RE.finditer(ANSI_RE.sub("", text))), default=0)


def detect_oom(text: str) -> bool:
    return any(p in text for p in OOM_PATTERNS)


# --------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    case: str
    mode: str  # "baseline" | "fused"
    cmd: list
    log_path: str
    rc: int | None = None
    status: str = "not run"
    seconds: float = 0.0
    steps: dict = field(default_factory=dict)
    tail: list = field(default_factory=list)
    expected_steps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.status == "ok"

    def loss_at(self, step):
        sm = self.steps.get(step)
        return None if sm is None else sm.loss

    @property
    def max_mem(self):
        return max((s.mem_gib for s in self.steps.values()), default=None)

    def _median(self, metric):
        """Median of a per-step metric without step 1 (warm-up, compile), or of all if that is all."""
        vals = [getattr(s, metric) for k, s in sorted(self.steps.items()) if k != 1]
        if not vals:
            vals = [getattr(s, metric) for s in self.steps.values()]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    @property
    def median_tps(self):
        return self._median("tps")

    @property
    def median_mfu(self):
        return self._median("mfu")


def summarize(res: RunResult, text: str):
    res.steps = parse_log(text)
    lines = [ANSI_RE.sub("", l) for l in text.splitlines() if l.strip()]
    res.tail = lines[-15:]
    res.extra["alloc_retries"] = alloc_retries(text)
    last = max(res.steps) if res.steps else 0
    bad = [s.step for s in res.steps.values() if not math.isfinite(s.loss)]
    if res.status == "timeout":
        pass
    elif detect_oom(text):
        res.status = "OOM"
    elif res.rc not in (0, None):
        res.status = f"failed rc={res.rc}"
    elif last < res.expected_steps:
        res.status = f"incomplete ({last}/{res.expected_steps} steps)"
    elif bad:
        res.status = f"non-finite loss at step {bad[0]}"
    else:
        res.status = "ok"
    return res


def run_job(case, mode, ngpu, args_list, opts, expected_steps, log_name=None, env_extra=None) -> RunResult:
    os.makedirs(opts.out, exist_ok=True)
    run_name = log_name or f"{case}_{mode}"
    log_path = os.path.join(opts.out, run_name + ".log")
    if opts.dump_folders:  # each run's TensorBoard events/outputs in its own folder
        args_list = args_list + ["--job.dump_folder", os.path.join(opts.dump_root or opts.out, run_name)]
    cmd = [opts.launcher] + args_list
    env = dict(os.environ)
    env["NGPU"] = str(ngpu)
    env["CONFIG_FILE"] = opts.config
    env.update(env_extra or {})
    env.setdefault("LOG_RANK", "0")
    # never unset the machine's NVLink-multicast guards
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        env.setdefault(k, v)
    res = RunResult(case, mode, cmd, log_path, expected_steps=expected_steps)
    env_text = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items())
    print(f"[e2e] {case}/{mode}: NGPU={ngpu} CONFIG_FILE={opts.config} {env_text + ' ' if env_text else ''}"
          f"{' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    print(f"[e2e]   log: {log_path}", flush=True)
    if opts.dry_run:
        res.status = "dry-run"
        return res
    t0 = time.time()
    with open(log_path, "w") as f:
        f.write(f"# NGPU={ngpu} CONFIG_FILE={opts.config} {env_text} {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            res.rc = -1
            res.status = f"could not start: {e}"
            res.tail = [str(e)]
            return res
        try:
            res.rc = proc.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            res.status = "timeout"
            # the whole process group of the job we started (torchrun and its workers)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
            res.rc = proc.returncode
    res.seconds = time.time() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    summarize(res, text)
    print(f"[e2e]   -> {res.status} in {res.seconds:.0f}s, {len(res.steps)} steps parsed"
          + (f", loss[1]={res.loss_at(1)}" if res.steps else ""), flush=True)
    if not res.ok:
        for l in res.tail[-8:]:
            print(f"[e2e]   | {l}", flush=True)
    return res


# --------------------------------------------------------------------------------------
# parity and tables
# --------------------------------------------------------------------------------------
def max_rel_diff(a: RunResult, b: RunResult):
    """max over common steps of |loss_a - loss_b| / |loss_b|; also the step where it happened."""
    common = sorted(set(a.steps) & set(b.steps))
    if not common:
        return None, None
    best, where = -1.0, None
    for s in common:
        la, lb = a.steps[s].loss, b.steps[s].loss
        d = abs(la - lb) / max(abs(lb), 1e-12) if (math.isfinite(la) and math.isfinite(lb)) else float("inf")
        if d > best:
            best, where = d, s
    return best, where


def header(title, opts, notes=()):
    return bench_common.header(title, notes=[
        f"- config: {opts.config}; launcher {opts.launcher}; logs under {opts.out}", *notes])


def emit(block, opts):
    bench_common.emit(block, opts.results, not (opts.no_append or opts.dry_run))


# --------------------------------------------------------------------------------------
# main modes
# --------------------------------------------------------------------------------------
def common_args(opts, steps, seed=True):
    a = ["--training.steps", str(steps), "--metrics.log_freq", "1"]
    if steps < opts.schedule_steps:
        # Replay the first `steps` learning rates of the configured job: by default torchtitan
        # squeezes the warmup into a short run, and at full lr the 1B config spikes by step 20
        # (loss 6 -> 10 at step 19), where any two runs diverge.
        a += ["--lr_scheduler.total_steps", str(opts.schedule_steps)]
    if seed:
        a += ["--debug.seed", str(opts.seed)]
    if opts.deterministic:
        a += ["--debug.deterministic"]
    if opts.seq_len:
        a += ["--training.seq_len", str(opts.seq_len)]
    if opts.local_batch:
        a += ["--training.local_batch_size", str(opts.local_batch)]
    return a + shlex.split(opts.extra)


def config_training(path):
    """The config's [training] section (local_batch_size, steps): the runs are judged against it."""
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f).get("training", {})
