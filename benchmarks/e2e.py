#!/usr/bin/env python3
"""End-to-end parity and memory/throughput of the fused CE in torchtitan training jobs.

For each named case it runs ``./run_train.sh`` twice (baseline, then with --fused_ce.enable),
same seed, saves each run's stdout+stderr to <out>/<case>_<mode>.log, parses torchtitan's
per-step metric lines, and prints (and appends to benchmarks/log/results.md) a table:
loss at steps 1/10/20, the max relative loss difference fused vs baseline over all steps,
max_reserved GiB (max over the logged steps), median tps (excluding step 1), ratios.

The per-step line comes from torchtitan 0.2.2 components/metrics.py (MetricsProcessor.log):
    f"{color.red}step: {step:2}  {color.green}loss: {global_avg_loss:8.5f}  "
    f"{color.orange}grad_norm: {grad_norm:7.4f}  "
    f"{color.turquoise}memory: {max_reserved_gib:5.2f}GiB({max_reserved_pct:.2f}%)  "
    f"{color.blue}tps: {round(tps):,}  {color.cyan}tflops: {tflops:,.2f}  "
    f"{color.magenta}mfu: {mfu:.2f}%{color.reset}"
behind the logger prefix "[titan] <asctime> - root - INFO - ", and behind "[rank0]:" when
torchrun tees with --local-ranks-filter.

Exit status: 0 all parity checks passed; 1 a parity check failed; 2 a run failed so a
parity check could not be made, or a check came out NOISE (and no parity check failed).
--noise-ref reruns each baseline: bf16 training is not bitwise reproducible here (on 2x H200,
same seed, the FSDP2 baseline ended step 10 at 7.79945, the FSDP2 reshard-always baseline -- the
same math -- at 7.79310, 8e-4 apart), so a 1e-3 tolerance over 10-20 steps is at the noise level; NOISE = above the tolerance but within
2x the baseline-vs-baseline difference.

--pairs N runs N baseline/fused pairs per case, alternating which mode goes first, and adds a
table of each pair's tps ratio (median and range): a host-bound layout (TP at small local batch)
drifts 20-30% between runs (RESULTS.md, 4 GPUs, commit 3a4e669), more than one pair can resolve.
Parity and memory come from the first pair.

Max-seq_len mode (--max-seq): one GPU, seq_len doubling from --seq-start until the first
failure (OOM or other), baseline vs fused, --max-seq-steps steps each.

Search mode (--search, e2e_search.py): under a GPU memory cap, the fastest setting (compile x
activation checkpointing x local batch) of the baseline and of the fused head.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import bench_common
from bench_common import RESULTS_LOG, ROOT, cell, ratio

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

# name -> (ngpu, extra args, precision of the loss/logits: "bf16" or "fp32")
# {accum2_gbs}: the global batch of two gradient-accumulation steps (2 x local batch x data-parallel degree 2)
CASES = {
    "fsdp2": (2, ["--parallelism.data_parallel_shard_degree", "2"], "bf16"),
    "tp2": (2, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2"], "fp32"),
    "cp2": (2, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.context_parallel_degree", "2"], "bf16"),
    "fsdp2_reshard_always": (
        2, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.fsdp_reshard_after_forward", "always"], "bf16"),
    "fsdp2_accum2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.global_batch_size", "{accum2_gbs}"], "bf16"),
    "fsdp2_compile": (
        2, ["--parallelism.data_parallel_shard_degree", "2", "--compile.enable", "--compile.components", "model,loss"], "bf16"),
    "single": (1, [], "bf16"),
    # 4 GPUs (issue 8): two parallelisms combined. bf16 in all four: CP alone also turns FSDP on
    # (over the dp_shard x cp mesh), and FSDP casts the parameters.
    "fsdp2_tp2": (4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"], "bf16"),
    "fsdp2_cp2": (4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.context_parallel_degree", "2"], "bf16"),
    "tp2_cp2": (
        4, ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "2",
            "--parallelism.context_parallel_degree", "2"], "bf16"),
    "hsdp": (
        4, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"], "bf16"),
}
DEFAULT_CASES = "fsdp2,tp2,cp2,fsdp2_reshard_always,fsdp2_accum2,fsdp2_compile"
MULTI4_CASES = "fsdp2_tp2,fsdp2_cp2,tp2_cp2,hsdp"  # gpu_run.sh multi4 (nvidia-h200-x4)
TOL = {"bf16": 1e-3, "fp32": 1e-4}


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


NOISE_FACTOR = 2.0


def parity(base: RunResult, fused: RunResult, precision: str, base2: RunResult | None = None):
    """PASS: max rel diff <= tol. With a second baseline run (base2, --noise-ref): a diff above tol
    but <= NOISE_FACTOR x the baseline-vs-baseline diff is reported as NOISE (not a failure)."""
    tol = TOL[precision]
    if not (base.ok and fused.ok):
        return "n/a", None, tol
    d, _ = max_rel_diff(fused, base)
    if d is None:
        return "n/a", None, tol
    if d <= tol:
        return "PASS", d, tol
    if base2 is not None and base2.ok:
        noise, _ = max_rel_diff(base2, base)
        if noise is not None and d <= NOISE_FACTOR * noise:
            return "NOISE", d, tol
    return "FAIL", d, tol


def make_table(pairs, steps_to_show=(1, 10, 20)):
    """pairs: list of (case, precision, base, fused[, base2]) RunResults; base2 = baseline rerun."""
    cols = ["case", "mode", "status"] + [f"loss@{s}" for s in steps_to_show] + [
        "max rel loss diff", "parity (tol)", "max_reserved GiB", "median tps", "mem fused/base", "tps fused/base"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    failures = []
    for case, precision, base, fused, *rest in pairs:
        base2 = rest[0] if rest else None
        verdict, d, tol = parity(base, fused, precision, base2)
        for r in (base, fused) + ((base2,) if base2 is not None else ()):
            is_f = r is fused
            row = [case if r is base else "", r.mode, r.status]
            row += [cell(r.loss_at(s), ".5f") for s in steps_to_show]
            if r is base2:
                nd = max_rel_diff(base2, base)[0] if (base.ok and base2.ok) else None
                row += [cell(nd, ".2e"), "run-to-run noise (baseline rerun)"]
            else:
                row += [cell(d, ".2e") if is_f else "", f"{verdict} ({tol:.0e}, {precision})" if is_f else ""]
            row += [cell(r.max_mem, ".2f"), cell(r.median_tps, ",.0f")]
            row += [cell(ratio(fused.max_mem, base.max_mem), ".3f") if is_f else "",
                    cell(ratio(fused.median_tps, base.median_tps), ".3f") if is_f else ""]
            lines.append("| " + " | ".join(row) + " |")
        if verdict != "PASS":
            failures.append((case, verdict, base, fused))
        elif base2 is not None and not base2.ok:
            failures.append((case, "n/a", base2, fused))
    return "\n".join(lines), failures


def failure_details(failures) -> str:
    out = []
    for case, verdict, base, fused in failures:
        for r in (base, fused):
            if r.ok:
                continue
            out.append(f"{case}/{r.mode}: {r.status} (log {os.path.relpath(r.log_path, ROOT)})")
            out += [f"    {l[:220]}" for l in r.tail[-10:]]
        if verdict in ("FAIL", "NOISE"):
            common = sorted(set(base.steps) & set(fused.steps))
            diffs = [f"{s}:{base.steps[s].loss:.5f}/{fused.steps[s].loss:.5f}" for s in common]
            out.append(f"{case}: loss base/fused per step: " + " ".join(diffs))
    return "\n".join(out)


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


def resolve_case(name, opts):
    if "=" in name:  # custom: name=NGPU:precision:args...
        nm, spec = name.split("=", 1)
        ngpu, prec, rest = spec.split(":", 2)
        return nm, int(ngpu), shlex.split(rest), prec
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)} (or name=NGPU:bf16|fp32:ARGS)")
    ngpu, a, prec = CASES[name]
    lb = opts.local_batch or opts.config_local_batch
    dp = 2
    a = [x.replace("{accum2_gbs}", str(2 * lb * dp)) for x in a]
    return name, ngpu, a, prec


def run_order(n_pairs: int, noise_ref: bool):
    """(mode, pair index) in the order the runs are made. Pair 0 is baseline, fused[, baseline2];
    odd pairs run fused first, so a drift over the call falls on both modes alike."""
    order = [("baseline", 0), ("fused", 0)] + ([("baseline2", 0)] if noise_ref else [])
    for i in range(1, n_pairs):
        pair = [("baseline", i), ("fused", i)]
        order += pair[::-1] if i % 2 else pair
    return order


def pairs_table(tps_pairs) -> str:
    """Per-pair median tps of both modes and their ratio, then the median and range of the ratios."""
    lines = ["| case | pair | first | baseline tps | fused tps | tps fused/base |", "|---|---|---|---|---|---|"]
    for case, runs in tps_pairs:
        ratios = []
        for i, base, fused in runs:
            r = ratio(fused.median_tps, base.median_tps) if (base.ok and fused.ok) else None
            if r is not None:
                ratios.append(r)
            lines.append(f"| {case if i == 0 else ''} | {i} | {'fused' if i % 2 else 'baseline'} "
                         f"| {cell(base.median_tps, ',.0f')} | {cell(fused.median_tps, ',.0f')} | {cell(r, '.3f')} |")
        if ratios:
            lines.append(f"| | median of {len(ratios)} | | | | {statistics.median(ratios):.3f} "
                         f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    return "\n".join(lines)


def run_cases(opts):
    names = [c.strip() for c in opts.cases.split(",") if c.strip()]
    pairs = []
    t_start = time.time()
    tps_pairs = []  # (case, [(pair index, baseline RunResult, fused RunResult)]) with --pairs > 1
    for name in names:
        nm, ngpu, case_args, prec = resolve_case(name, opts)
        results = {}
        for mode, pair in run_order(opts.pairs, opts.noise_ref):
            a = case_args + common_args(opts, opts.steps)
            if mode == "fused":
                a += shlex.split(opts.fused_flag)
            if opts.budget and time.time() - t_start > opts.budget:
                r = RunResult(nm, mode, [opts.launcher] + a, "", status="skipped (budget)")
                print(f"[e2e] {nm}/{mode}: skipped, --budget {opts.budget}s spent", flush=True)
            else:
                r = run_job(nm, mode, ngpu, a, opts, opts.steps, log_name=f"{nm}_{mode}_p{pair}" if pair else None)
            results[mode, pair] = r
        pairs.append((nm, prec, results["baseline", 0], results["fused", 0])
                     + ((results["baseline2", 0],) if opts.noise_ref else ()))
        if opts.pairs > 1:
            tps_pairs.append((nm, [(i, results["baseline", i], results["fused", i]) for i in range(opts.pairs)]))
    steps_to_show = tuple(s for s in (1, 10, 20) if s <= opts.steps) or (1,)
    if opts.steps not in steps_to_show:
        steps_to_show = steps_to_show + (opts.steps,)
    table, failures = make_table(pairs, steps_to_show)
    notes = [
        f"- steps {opts.steps}, seed {opts.seed}, deterministic {opts.deterministic}, noise-ref {opts.noise_ref}, "
        f"pairs {opts.pairs}; "
        f"fused flag `{opts.fused_flag}`; "
        f"extra `{opts.extra}`",
        "- max_reserved GiB: max over steps of torchtitan's per-step max_reserved; tps: median per-GPU tps "
        "excluding step 1; parity: max over steps of |loss_fused - loss_base| / |loss_base| "
        "(tolerance 1e-3 bf16, 1e-4 fp32; NOISE: above it but <= 2x the baseline-rerun diff)",
    ]
    block = header("End-to-end: torchtitan baseline vs fused CE", opts, notes)
    if tps_pairs:
        block += pairs_table(tps_pairs) + "\n\n"
    det = failure_details(failures)
    if det:
        block += "Failures / runs that did not finish (last log lines):\n```\n" + det + "\n```\n\n"
    block += table  # the table last
    emit(block, opts)
    if any(v == "FAIL" for _, v, _, _ in failures):
        return 1
    if failures:
        return 2
    return 0


def run_max_seq(opts):
    seqs = []
    s = opts.seq_start
    while s <= opts.seq_max:
        seqs.append(s)
        s *= 2
    if opts.seqs:
        seqs = [int(x) for x in opts.seqs.split(",") if x.strip()]
    lb = opts.max_seq_local_batch
    rows = []
    t_start = time.time()
    for mode in ("baseline", "fused"):
        longest, first_fail = None, None
        per = []
        for seq in seqs:
            if opts.budget and time.time() - t_start > opts.budget:
                print(f"[e2e] max-seq {mode} seq {seq}: skipped, --budget {opts.budget}s spent", flush=True)
                first_fail = (seq, RunResult("maxseq", mode, [], "", status="skipped (budget)"))
                break
            a = ["--training.steps", str(opts.max_seq_steps), "--metrics.log_freq", "1",
                 "--debug.seed", str(opts.seed), "--training.seq_len", str(seq)]
            if lb:
                a += ["--training.local_batch_size", str(lb)]
            a += shlex.split(opts.extra)
            if mode == "fused":
                a += shlex.split(opts.fused_flag)
            r = run_job(f"maxseq{seq}", mode, 1, a, opts, opts.max_seq_steps)
            per.append((seq, r))
            if r.ok:
                longest = seq
            else:
                first_fail = (seq, r)
                break
        rows.append((mode, longest, first_fail, per))
    lines = ["| mode | longest seq_len that trained | first failure | max_reserved GiB at longest | median tps at longest | runs |",
             "|---|---|---|---|---|---|"]
    for mode, longest, ff, per in rows:
        at = next((r for s, r in per if s == longest), None)
        runs = ", ".join(f"{s}:{r.status}" for s, r in per)
        lines.append(f"| {mode} | {longest or 'none'} | {f'{ff[0]} ({ff[1].status})' if ff else 'none of those tried'} "
                     f"| {cell(at.max_mem, '.2f') if at else ''} | {cell(at.median_tps, ',.0f') if at else ''} | {runs} |")
    tried = f"seq_lens {opts.seqs}" if opts.seqs else f"seq_len doubling {opts.seq_start}..{opts.seq_max}"
    notes = [f"- one GPU, {opts.max_seq_steps} steps per try, local batch {lb or 'from config'}, {tried}, "
             f"stop at first failure; fused flag `{opts.fused_flag}`"]
    block = header("Max seq_len on one GPU: baseline vs fused CE", opts, notes) + "\n".join(lines)
    emit(block, opts)
    return 0


def config_training(path):
    """The config's [training] section (local_batch_size, steps): the runs are judged against it."""
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f).get("training", {})


def main(argv=None):
    import e2e_search  # the --search mode (it builds on this module's runs and tables)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help=f"comma list of {', '.join(CASES)}; or custom name=NGPU:bf16|fp32:ARGS")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--deterministic", action="store_true", help="pass --debug.deterministic")
    p.add_argument("--config", default=os.path.join("train_configs", "llama3_1b.toml"))
    p.add_argument("--launcher", default="./run_train.sh")
    p.add_argument("--fused-flag", default="--fused_ce.enable")
    p.add_argument("--extra", default="", help="extra args for every run (one string)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="override training.seq_len")
    p.add_argument("--local-batch", type=int, default=None, help="override training.local_batch_size")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--budget", type=float, default=0, help="skip remaining runs after this many s (0: no limit)")
    p.add_argument("--out", default=os.path.join("outputs", "e2e"))
    p.add_argument("--results", default=RESULTS_LOG, help="the results log to append to")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--no-dump-folders", dest="dump_folders", action="store_false",
                   help="do not pass --job.dump_folder <dump-root>/<case>_<mode> per run")
    p.add_argument("--dump-root", default=None, help="parent of the per-run dump folders (default --out)")
    p.add_argument("--noise-ref", action="store_true",
                   help="also rerun the baseline: reports run-to-run loss noise; a fused diff above the "
                        f"tolerance but <= {NOISE_FACTOR}x that noise is NOISE, not FAIL")
    p.add_argument("--pairs", type=int, default=1,
                   help="baseline/fused pairs per case, alternating which runs first; >1 adds a table of "
                        "per-pair tps ratios (parity and memory: the first pair)")
    p.add_argument("--seqs", default=None, help="max-seq: comma list of seq_lens to try instead of doubling")
    p.add_argument("--max-seq", action="store_true", help="one-GPU longest-seq_len search instead of the cases")
    p.add_argument("--seq-start", type=int, default=8192)
    p.add_argument("--seq-max", type=int, default=262144)
    p.add_argument("--max-seq-steps", type=int, default=5)
    p.add_argument("--max-seq-local-batch", type=int, default=1, help="0: the config's")
    e2e_search.add_arguments(p)
    opts = p.parse_args(argv)
    if opts.pairs < 1:
        p.error(f"--pairs must be >= 1, got {opts.pairs}")
    opts.out = os.path.abspath(opts.out)
    training = config_training(os.path.join(ROOT, opts.config))  # join keeps an absolute path
    opts.config_local_batch = int(training.get("local_batch_size", 2))
    opts.schedule_steps = int(training.get("steps", 0))
    if opts.max_seq:
        return run_max_seq(opts)
    if opts.search:
        return e2e_search.run_search(opts)
    return run_cases(opts)


if __name__ == "__main__":
    sys.exit(main())
