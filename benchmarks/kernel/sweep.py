"""Kernel benchmark, sweep mode (``kernel/bench.py --sweep``): the fused op against
torch.compile over N (2k..64k), V (32k..262k) and D (2k..8k), plus short batches with the largest
vocabularies. One row per point: each implementation's time and peak, the fused/compile ratios,
the chunk plan's prediction (``fused_loss.plan.plan_chunks``) beside the measurement, and the
dh/dW/loss errors of fused and of eager against the fp64 reference (random inputs) where
N <= --acc-max-n. Fewer reps than the default mode (--reps 5 unless given) so the whole sweep
fits in about 4 minutes on one H200; eager is timed nowhere here (compile is the anchor), it is
only called once per point for its accuracy.
"""
from __future__ import annotations

import time

import torch

from benchmarks.bench_common import cell, md_table, ratio
from benchmarks.kernel.common import (
    NotAvailable, Row, accuracy_of, inputs_or_none, log, print_row, reference_or_none, run_one,
)
from benchmarks.kernel.impls import build_impl, eager_fn

from fused_loss.plan import plan_chunks

# (axis, (N, D, V)); a point on several axes is measured once and shown on each
FULL_POINTS = (
    [("N", (n, 4096, 128256)) for n in (2048, 8192, 16384, 32768, 65536)]
    + [("V", (8192, 4096, v)) for v in (32000, 128256, 151936, 262144)]
    + [("D", (8192, d, 128256)) for d in (2048, 4096, 8192)]
    + [("short", s) for s in ((4096, 3840, 262144), (2048, 4096, 262144), (8192, 2304, 256000))]
    # a Llama-4-sized head: the carry's backward moment sets the workspace, the chunks fill it
    + [("big", (16384, 5120, 202048))]
)
QUICK_POINTS = (
    [("N", (n, 64, 1000)) for n in (128, 256, 512)]
    + [("V", (256, 64, v)) for v in (500, 2000)]
    + [("D", (256, d, 1000)) for d in (32, 64)]
    + [("short", (64, 64, 4000))]
)


def plan_prediction(shape, args):
    """The chunk plan the fused op picks for this shape (fused_loss.plan.plan_chunks, called as
    the op calls it: --chunk-budget-mib or the default cap, fp32 dW carry asked for; "mean" announces its upstream
    gradient, so dh is not kept in fp32 then)."""
    N, D, V = shape
    dtype = getattr(torch, args.dtype)
    return plan_chunks(N, D, V, torch.empty((), dtype=dtype).element_size(), want_grad=True,
                       weight_grad_fp32=True, weight_is_fp32=dtype == torch.float32,
                       dh_fp32=args.reduction == "sum", chunk_size=args.chunk_size or None,
                       chunk_budget_bytes=(args.chunk_budget_mib or 0) << 20 or None)


def measure_point(shape, impls, args, dev) -> dict:
    """{impl: Row} timed on random inputs (with errors where N <= --acc-max-n), the eager
    accuracy (errors or a status), and the plan."""
    dtype = getattr(torch, args.dtype)
    out = {"rows": {}, "eager_acc": None, "eager_status": "", "plan": plan_prediction(shape, args)}
    dev.cleanup()
    inp = inputs_or_none(shape, dtype, dev, args)
    if inp is None:
        out["rows"] = {name: Row(shape, name, status="OOM (inputs)") for name in impls}
        return out
    ref = reference_or_none(inp, dev, args)
    for name in impls:
        try:
            fn = build_impl(name, args, dev)
        except NotAvailable as e:
            out["rows"][name] = Row(shape, name, status=str(e))
            continue
        out["rows"][name] = run_one(name, fn, inp, dev, args, ref=ref)
        del fn
        print_row(out["rows"][name])
    if ref is not None:
        out["eager_acc"], out["eager_status"] = accuracy_of(eager_fn(args.reduction), inp, dev, ref)
        if out["eager_acc"]:
            log("     eager accuracy: loss {:.1e} dh {:.1e} dW {:.1e}".format(*out["eager_acc"]))
    del inp, ref
    dev.cleanup()
    if "lm" in args.inputs.split(",") and shape[0] <= args.acc_max_n:
        out["lm"] = lm_accuracy(shape, impls[0], args, dev)
    return out


def lm_accuracy(shape, subject, args, dev) -> dict:
    """{subject, "eager"}: (loss, dh, dW) errors (or a status) on LM-like inputs (a peaked
    softmax, kernel.common.make_lm_inputs), one untimed call each."""
    dtype = getattr(torch, args.dtype)
    inp = inputs_or_none(shape, dtype, dev, args, kind="lm")
    ref = None if inp is None else reference_or_none(inp, dev, args, " (lm)")
    if ref is None:
        return {}
    acc = {}
    for name, fn in ((subject, build_impl(subject, args, dev)), ("eager", eager_fn(args.reduction))):
        errs, status = accuracy_of(fn, inp, dev, ref)
        acc[name] = errs if errs else status
        if errs:
            log(f"     {name} accuracy (lm): loss {errs[0]:.1e} dh {errs[1]:.1e} dW {errs[2]:.1e}")
    del inp, ref
    dev.cleanup()
    return acc


def sweep(args, dev) -> tuple[str, float]:
    """(the table in Markdown, wall seconds)."""
    t0 = time.perf_counter()
    pts = QUICK_POINTS if args.quick else FULL_POINTS
    impls = [s.strip() for s in args.sweep_impls.split(",") if s.strip()]
    cache = {}
    table_rows = []
    for axis, shape in pts:
        if shape not in cache:
            N, D, V = shape
            log(f"\n=== sweep {axis}: N={N} D={D} V={V} ===")
            cache[shape] = measure_point(shape, impls, args, dev)
        table_rows.append((axis, shape, cache[shape]))
    wall = time.perf_counter() - t0
    return sweep_table(table_rows, impls), wall


def sweep_table(table_rows, impls) -> str:
    subject = impls[0]
    anchor = impls[1] if len(impls) > 1 else None

    def row_of(p, name):
        return p["rows"].get(name)

    def ms(name):
        def get(t):
            r = row_of(t[2], name)
            return "" if r is None else (cell(r.ms, ".2f") if r.ms is not None else r.status)
        return get

    def peak(name):
        return lambda t: cell(getattr(row_of(t[2], name), "peak_gib", None), ".2f")

    def plan_field(fn, spec=None):
        def get(t):
            plan = t[2]["plan"]
            return cell(fn(plan), spec) if spec else str(fn(plan))
        return get

    def subj_vs_plan(attr, plan_attr, scale):
        def get(t):
            plan, r = t[2]["plan"], row_of(t[2], subject)
            if r is None:
                return ""
            return cell(ratio(getattr(r, attr), getattr(plan, plan_attr) / scale), ".2f")
        return get

    def err(name, i):
        def get(t):
            if name == "eager":
                acc = t[2]["eager_acc"]
                return cell(acc[i], ".1e") if acc else ("" if not t[2]["eager_status"] else t[2]["eager_status"])
            r = row_of(t[2], name)
            return "" if r is None else cell((r.loss_err, r.dh_err, r.dW_err)[i], ".1e")
        return get

    def lm_err(name, i):
        def get(t):
            acc = t[2].get("lm", {}).get(name)
            return "" if acc is None else (cell(acc[i], ".1e") if isinstance(acc, tuple) else acc)
        return get

    def status(t):
        bad = [f"{n}: {r.status}" for n, r in t[2]["rows"].items() if r.status != "ok"]
        return "; ".join(bad) if bad else "ok"

    cols = [
        ("axis", lambda t: t[0]),
        ("N", lambda t: str(t[1][0])),
        ("D", lambda t: str(t[1][1])),
        ("V", lambda t: str(t[1][2])),
    ]
    cols += [(f"{n} ms", ms(n)) for n in impls]
    if anchor:
        cols.append((f"{subject}/{anchor} ms", lambda t: cell(ratio(
            getattr(row_of(t[2], subject), "ms", None), getattr(row_of(t[2], anchor), "ms", None)), ".3f")))
    if "floor" in impls and subject != "floor":
        cols.append((f"{subject}/floor ms", lambda t: cell(ratio(
            getattr(row_of(t[2], subject), "ms", None), getattr(row_of(t[2], "floor"), "ms", None)),
            ".3f")))
    cols += [(f"{n} peak GiB", peak(n)) for n in impls if n != "floor"]
    if anchor:
        cols.append((f"{subject}/{anchor} peak", lambda t: cell(ratio(
            getattr(row_of(t[2], subject), "peak_gib", None), getattr(row_of(t[2], anchor), "peak_gib", None)),
            ".2f")))
    cols += [
        ("plan chunks", plan_field(lambda p: p.n_chunks)),
        ("plan rows", plan_field(lambda p: p.rows)),
        ("plan fp32 carry", plan_field(lambda p: "yes" if p.carry_fp32 else "no")),
        ("plan ms", plan_field(lambda p: p.predicted_ms, ".2f")),
        (f"{subject} ms / plan", subj_vs_plan("ms", "predicted_ms", 1.0)),
        ("plan workspace GiB", plan_field(lambda p: p.workspace_bytes / 2**30, ".2f")),
        (f"{subject} peak / plan", subj_vs_plan("peak_gib", "workspace_bytes", 2**30)),
        (f"{subject} dh err", err(subject, 1)),
        ("eager dh err", err("eager", 1)),
        (f"{subject} dW err", err(subject, 2)),
        ("eager dW err", err("eager", 2)),
        (f"{subject} loss err", err(subject, 0)),
        ("eager loss err", err("eager", 0)),
        (f"{subject} dh err lm", lm_err(subject, 1)),
        ("eager dh err lm", lm_err("eager", 1)),
        (f"{subject} dW err lm", lm_err(subject, 2)),
        ("eager dW err lm", lm_err("eager", 2)),
        (f"{subject} loss err lm", lm_err(subject, 0)),
        ("eager loss err lm", lm_err("eager", 0)),
        ("status", status),
    ]
    return md_table(table_rows, cols)


def main(args, dev) -> int:
    table, wall = sweep(args, dev)
    impls = args.sweep_impls
    dev.emit(args, "Fused CE sweep (fwd+bwd)", table, (
        f"- impls: {impls}; dtype {args.dtype}; reduction {args.reduction}; fused backend={args.backend}; "
        f"warmup {args.warmup} calls and >= {args.warmup_s:g} s per impl, reps {args.reps} (median)",
        "- inputs: random (h ~ N(0,1), W ~ N(0, 0.02^2), labels uniform, 10% ignored), timed; errors: relative "
        f"L2 vs the fp64 reference (no TF32), N <= {args.acc_max_n} only, on those and ('lm' columns) on "
        "LM-like inputs (a peaked softmax: kernel.common.make_lm_inputs); eager is not timed, only called "
        "once per point for its errors. floor: the three cuBLAS GEMMs alone (--floor-chunk rows per chunk, "
        "bf16 dW by beta=1). peak GiB: as in the default table (beyond inputs and their grads).",
        "- plan: fused_loss.plan.plan_chunks(N, D, V, element_size, want_grad=True, weight_grad_fp32=True) "
        "for the default budget: chunks, rows per chunk, fp32 dW carry, predicted ms and workspace GiB; "
        "'ms / plan' and 'peak / plan' are measured over predicted.",
        f"- wall time of the sweep: {wall:.0f} s",
    ))
    return 0
