"""Kernel benchmark, profile mode (``kernel/bench.py --profile``): where one fwd+bwd's time goes.

For each point (--shapes; default the sweep's points where the fused op was slower than
torch.compile) and each of --sweep-impls (default fused, compile): warm up as the timing does
(>= --warmup-s), then run --reps steps under torch.profiler (CUDA activity) and sum each
kernel's device time per step. One row per kernel class of each (point, impl): the GEMMs,
the cross-entropy's own kernels (ours: the Triton row passes; compile's: its generated Triton
kernels), the scale pass, copies and fills, everything else, plus "idle": the step's time
(synchronized wall time, without the profiler) minus its kernels' time, i.e. launch gaps and
host work. Two more rows place that idle time from the profiler's trace (host activity
recorded too, which slows the host a little): "host lead", from the step's start on the host
to its first GEMM's start on the device (the host path before the first launch, exposed in
full when a step starts from an idle device, hidden behind queued work in a training step),
and "gaps after the first GEMM" (the device idle between the step's kernels from there on:
~0 where the host keeps ahead of the device; blank on CPU).
On CPU (--quick, the smoke test) the kernels are the aten ops' own CPU time and the first
GEMM is the first aten::mm / addmm.
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.bench_common import cell, md_table
from benchmarks.kernel.common import failure_status, inputs_or_none, log, parse_shapes, release
from benchmarks.kernel.impls import build_impl

DEFAULT_POINTS = "2048x4096x128256,8192x4096x32000,8192x2304x256000"

# (class, substrings of the kernel name, lower case); the first match wins
CLASSES = (
    ("scale pass", ("_scale_kernel",)),
    ("CE rows (ours)", ("_stats", "_grad_kernel")),
    # the "epilogue" path's logits GEMM (epilogue_triton, epilogue_gluon)
    ("logits GEMM + statistics (ours)", ("_logits_kernel",)),
    ("GEMM", ("gemm", "cutlass", "nvjet", "sm90_", "cublas", "aten::mm", "aten::addmm")),
    ("CE (compile's Triton)", ("triton_",)),
    ("copy / fill", ("copy", "fill", "memset", "memcpy")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


GEMM_CLASSES = ("GEMM", "logits GEMM + statistics (ours)")
STEP_MARK = "kernel_profile_step"
CPU_GEMMS = ("aten::mm", "aten::addmm")


def trace_idle(prof, cuda: bool) -> tuple[float, float | None]:
    """(host lead, gaps after the first GEMM) in ms, medians over the marked steps of the
    profiler's trace (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == STEP_MARK]
    if cuda:
        work = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        is_gemm = [kernel_class(e["name"]) in GEMM_CLASSES for e in work]
    else:
        work = [e for e in events if e.get("cat") == "cpu_op" and e["name"] in CPU_GEMMS]
        is_gemm = [True] * len(work)
    leads, gaps = [], []
    for s in steps:
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        mine = sorted((e["ts"], e["ts"] + e["dur"], g) for e, g in zip(work, is_gemm)
                      if t0 <= e["ts"] <= t1)
        gemm_starts = [a for a, _, g in mine if g]
        if not gemm_starts:
            continue
        leads.append((gemm_starts[0] - t0) / 1e3)
        after = [(a, b) for a, b, _ in mine if a >= gemm_starts[0]]
        idle, end = 0.0, after[0][1]
        for a, b in after[1:]:
            idle += max(0.0, a - end)
            end = max(end, b)
        gaps.append(idle / 1e3)
    if not leads:
        return None, None
    return statistics.median(leads), statistics.median(gaps) if cuda else None


def _step(fn, h, W, y):
    h.grad = None
    W.grad = None
    fn(h, W, y).backward()


def profile_impl(name, shape, args, dev) -> list[tuple]:
    """[(class, kernels per step, ms per step, share of the step)] plus ("idle", ...) and the
    step's own time as ("step", ...)."""
    inp = inputs_or_none(shape, getattr(torch, args.dtype), dev, args)
    if inp is None:
        return [("step", None, None, "OOM (inputs)")]
    fn = None
    try:
        fn = build_impl(name, args, dev)
        h, W, y = inp.h, inp.W, inp.y
        _step(fn, h, W, y)
        dev.sync()
        warm_until = time.perf_counter() + args.warmup_s
        while time.perf_counter() < warm_until:
            _step(fn, h, W, y)
        dev.sync()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            _step(fn, h, W, y)
            dev.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        step_ms = statistics.median(times)
        # on CPU (the smoke test) the "kernels" are the aten ops' own CPU time
        activity = ProfilerActivity.CUDA if dev.cuda else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            for _ in range(args.reps):
                _step(fn, h, W, y)
            dev.sync()
        with profile(activities=sorted({ProfilerActivity.CPU, activity}, key=str)) as traced:
            for _ in range(args.reps):  # each step from an idle device, as the timing's
                with record_function(STEP_MARK):
                    _step(fn, h, W, y)
                    dev.sync()
        lead_ms, gaps_ms = trace_idle(traced, dev.cuda)
        per_class = collections.defaultdict(lambda: [0, 0.0])
        for ev in prof.key_averages():
            us = ev.self_device_time_total if dev.cuda else ev.self_cpu_time_total
            if us <= 0:
                continue
            c = per_class[kernel_class(ev.key)]
            c[0] += ev.count
            c[1] += us / 1e3
    except Exception as e:
        return [("step", None, None, failure_status(e))]
    finally:
        release(fn, inp, dev)
    rows = [(cls, n / args.reps, ms / args.reps) for cls, (n, ms) in per_class.items()]
    rows.sort(key=lambda r: -r[2])
    busy = sum(r[2] for r in rows)
    rows.append(("idle (step - kernels)", None, step_ms - busy))
    rows.append(("of which host lead (trace)", None, lead_ms))
    rows.append(("of which gaps after the first GEMM (trace)", None, gaps_ms))
    return [("step", None, step_ms, 1.0)] + [
        (c, n, ms, None if ms is None else ms / step_ms) for c, n, ms in rows]


def main(args, dev) -> int:
    points = parse_shapes(args.shapes or DEFAULT_POINTS)
    impls = [s.strip() for s in args.sweep_impls.split(",") if s.strip()]
    table = []
    for shape in points:
        for name in impls:
            log(f"=== profile {name} at {shape}")
            for cls, n, ms, share in profile_impl(name, shape, args, dev):
                table.append(("x".join(map(str, shape)), name, cls, n, ms, share))
    cols = [("point (N x D x V)", lambda r: r[0]), ("impl", lambda r: r[1]),
            ("kernels", lambda r: r[2]), ("launches / step", lambda r: cell(r[3], ".0f")),
            ("ms / step", lambda r: cell(r[4], ".3f")),
            ("share", lambda r: r[5] if isinstance(r[5], str) else cell(r[5], ".3f"))]
    dev.emit(args, "Kernel profile: where a fwd+bwd's time goes", md_table(table, cols), (
        f"- dtype {args.dtype}, reduction {args.reduction}, fused backend={args.backend}, random "
        f"inputs; warm-up >= {args.warmup_s:g} s per impl, then {args.reps} steps under "
        f"torch.profiler ({'CUDA' if dev.cuda else 'CPU'} activity); 'step' is the median wall time of "
        f"{args.reps} unprofiled steps, each synchronized",
    ))
    return 0
