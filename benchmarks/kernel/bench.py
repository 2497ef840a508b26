#!/usr/bin/env python3
"""Kernel benchmark: fused linear + cross-entropy (LM head), forward + backward.

Compares, on the SAME inputs in the SAME process (reduction --reduction, default "mean" as a
trainer's 1/valid-tokens; "sum" too):
  fused     fused_loss.fused_linear_cross_entropy(h, W, y, reduction=..., backend=--backend)
  fused_bf16dw  the same with weight_grad_fp32=False (dW carried across chunks in bf16)
  fused_checked the same with check_labels=True (label range checked on device: a host sync)
  fused_lean    the lean setting: weight_grad_fp32=False and a 512 MiB logits budget
  eager     F.cross_entropy((h @ W.T).float(), y, reduction=..., ignore_index=-100)
  compile   torch.compile(dynamic=False) of that same function
  liger     liger_kernel LigerFusedLinearCrossEntropyLoss(reduction=...)(W, h, y)
  cce       cut_cross_entropy.linear_cross_entropy(h, W, y, reduction=...)
  floor     the three cuBLAS GEMMs alone, token chunks of --floor-chunk rows:
            z = h_c @ W^T (reused buffer), dh_c = z @ W, dW.addmm_(z^T, h_c) (beta=1;
            the first chunk writes dW with mm(out=)), no cross-entropy math at all.

Definitions (also printed into the results block):
  ms        median over --reps timed iterations (CUDA events around one fwd+bwd) after
            --warmup untimed iterations and at least --warmup-s seconds of them (sustained
            clocks); grads are set to None before every iteration, so every iteration
            allocates its gradients like a training step does.
  TFLOP/s   6*N*D*V / time.
  peak GiB  torch.cuda.max_memory_allocated() during one extra fwd+bwd (after
            reset_peak_memory_stats) minus memory_allocated() just before it (inputs live,
            grads None, warm-up done) minus the bytes of the gradients dh and dW (= bytes of
            h and W). I.e. the transient/extra memory the op needs beyond inputs + grads.
  errors    relative L2 error ||x - ref|| / ||ref|| of dh, dW and the loss against an fp64
            reference (kernel.common.fp64_reference: h, W upcast exactly to float64, loss, dh, dW
            computed in float64 in --ref-chunk-row chunks on the device, no TF32 anywhere).
            Skipped when N > --acc-max-n (default 16384).
  inputs    --inputs random,lm (default both): the errors are reported for each kind, the times
            are of the first kind only. random: h ~ N(0,1), W ~ N(0, 0.02^2), labels uniform
            (10% ignore_index): a flat softmax. lm: the same W and labels, h built so the softmax
            is peaked as in a trained LM (the label's logit log(V) + N(2.5, 2^2) above zero,
            4 plausible alternatives 0.5..5 below it, noise of std 1): mean target probability
            ~0.45, entropy ~3 nats (each block's notes give the measured values per shape).
  first s   wall seconds of the first call (includes torch.compile / Triton autotuning).

Modes (this file is the command line of all of them):
  default          the four anchor shapes (here)
  --sweep          fused and torch.compile over N 2k..64k, V 32k..262k, D 2k..8k and short batches with
                   the largest vocabularies: ratios, the chunk plan's prediction, fp64 errors of fused
                   and eager (kernel/sweep.py; --reps 5 unless given; ~4 min on one H200)
  --options        the 8B head (or --shapes): the fused op with each option off and on
                   (plain call, explicit all-off, bias, class_weight, shift, token_stats, softcap 30,
                   label smoothing 0.1, z-loss 1e-4, lean): ms, ratio to all-off, peak (here)
  --profile        the sweep's points slower than torch.compile (or --shapes): each kernel class's
                   time per fwd+bwd of --sweep-impls, and the step's idle time (kernel/profiling.py)
  --vocab-parallel run under `torchrun --nproc_per_node 2`: W sharded by vocabulary rows
                   (kernel/vocab_parallel.py)
  --quick          tiny shapes, backend torch, works on CPU (--device cpu); for the smoke test
Shared: kernel/common.py (inputs, reference, timing, columns), kernel/impls.py (the implementations).

The Markdown table is printed LAST and appended to benchmarks/log/results.md unless --no-append.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.kernel import profiling as kernel_profile
from benchmarks.kernel import sweep as kernel_sweep
from benchmarks.kernel import vocab_parallel as kernel_vocab_parallel
from benchmarks.bench_common import RESULTS_LOG, cell, md_table
from benchmarks.kernel.common import (
    INPUT_KINDS, PEAK_COL, TAIL_COLS, TFLOPS_COL, W_STD, Dev, NotAvailable, Row, accuracy_of, extra_col,
    inputs_or_none, log, parse_shapes, print_row, reference_or_none, run_one, shape_label,
)
from benchmarks.kernel.impls import ALL_IMPLS, ANCHOR_IMPLS, OPTION_VARIANTS, build_impl, build_option_impl

DEFAULT_SHAPES = "8192x4096x128256,8192x2304x256000,16384x2048x151936,32768x4096x128256"
QUICK_SHAPES = "128x64x1000,256x32x2000"
OPTIONS_SHAPE = "8192x4096x128256"
QUICK_OPTIONS_SHAPE = "256x64x1000"


def add_ratios(rows):
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r.shape, []).append(r)
    for shape, rs in by_shape.items():
        anchors = [r.ms for r in rs if r.impl in ANCHOR_IMPLS and r.ms is not None and r.status == "ok"]
        best = min(anchors) if anchors else None
        floor = next((r.ms for r in rs if r.impl == "floor" and r.ms is not None), None)
        eager = next((r for r in rs if r.impl == "eager"), None)
        for r in rs:
            r.extra["vs_best_anchor"] = (r.ms / best) if (best and r.ms) else None
            r.extra["vs_floor"] = (r.ms / floor) if (floor and r.ms) else None
            r.extra["err_vs_eager"] = worst_err_ratio(r, eager)


def worst_err_ratio(r, eager):
    """max over input kinds of dh_err / eager's and dW_err / eager's (<= 1: no less accurate)."""
    if eager is None or r.impl == "floor":
        return None
    mine, base = r.extra.get("acc", {}), eager.extra.get("acc", {})
    ratios = [m / b for kind, errs in mine.items() if kind in base
              for m, b in zip(errs[1:], base[kind][1:]) if m is not None and b]
    return max(ratios) if ratios else None




def acc_cols(kinds):
    def get(kind, i):
        def f(r):
            errs = r.extra.get("acc", {}).get(kind)
            return r.extra.get("acc_status", {}).get(kind, "") if errs is None else cell(errs[i], ".1e")
        return f
    return [(f"{what} err {kind}", get(kind, i)) for kind in kinds for i, what in enumerate(("loss", "dh", "dW"))]


def markdown_table(rows, kinds=("random",)) -> str:
    # the shape is named on its first row only
    named = {id(r) for i, r in enumerate(rows) if i == 0 or rows[i - 1].shape != r.shape}
    return md_table(rows, [
        ("shape (N, D, V)", lambda r: shape_label(r.shape) if id(r) in named else ""),
        ("impl", lambda r: r.impl),
        ("ms", lambda r: cell(r.ms, ".2f") if r.ms is not None else (r.status if r.status != "ok" else "")),
        TFLOPS_COL,
        ("vs best anchor", extra_col("vs_best_anchor", ".3f")),
        ("vs GEMM floor", extra_col("vs_floor", ".3f")),
        PEAK_COL,
        ("peak+grads GiB", extra_col("peak_incl_grads", ".2f")),
        *acc_cols(kinds),
        ("err / eager (max)", extra_col("err_vs_eager", ".2f")),
        *TAIL_COLS,
    ])




DEFINITIONS = (  # one line of the results block
    "- ms: median of timed fwd+bwd iterations (CUDA events, after warm-up of each impl right "
    "before its timing, long enough for sustained clocks; grads set to None before each). "
    "peak GiB: max_memory_allocated during one fwd+bwd minus memory_allocated "
    "before it (inputs live, grads None) minus bytes of dh and dW; peak+grads GiB: the same without "
    "subtracting dh and dW. Random inputs: h ~ N(0,1), "
    "{S}. Errors: relative L2 vs the fp64 reference "
    "(no TF32), per input kind; times from the first kind only. err / eager (max): the largest of "
    "dh err / eager's and dW err / eager's over the kinds (<= 1: no less accurate than eager). vs best anchor: ms / min(eager, compile, liger, cce). floor: three cuBLAS GEMMs "
    "in chunks of {C} rows."
)


def input_kinds(args):
    kinds = [k.strip() for k in args.inputs.split(",") if k.strip()]
    bad = [k for k in kinds if k not in INPUT_KINDS]
    if bad or not kinds:
        raise SystemExit(f"--inputs: a comma list of {','.join(INPUT_KINDS)}, got {args.inputs!r}")
    return kinds


def bench_shapes(args, dev: Dev):
    """(rows, notes): every impl timed on the first input kind (with its errors), then the errors
    of every impl that ran on each further kind (one untimed call each)."""
    shapes = parse_shapes(args.shapes)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    kinds = input_kinds(args)
    dtype = getattr(torch, args.dtype)
    rows, notes = [], []
    for shape in shapes:
        N, D, V = shape
        log(f"\n=== shape N={N} D={D} V={V} ({shape_label(shape)}), {args.dtype} ===")
        dev.cleanup()
        inp = inputs_or_none(shape, dtype, dev, args, kind=kinds[0])
        if inp is None:
            rows.extend(Row(shape, name, status="OOM (inputs)") for name in impls)
            continue
        ref = reference_or_none(inp, dev, args)
        stats = [f"{kinds[0]} {ref.describe()}"] if ref is not None else []
        shape_rows = []
        for name in impls:
            try:
                fn = build_impl(name, args, dev)
            except NotAvailable as e:
                r = Row(shape, name, status=str(e))
                shape_rows.append(r)
                print_row(r)
                continue
            r = run_one(name, fn, inp, dev, args, ref=ref)
            del fn
            shape_rows.append(r)
            print_row(r)
        del inp, ref
        dev.cleanup()
        for kind in kinds[1:]:
            if args.no_accuracy or N > args.acc_max_n:
                break
            inp = inputs_or_none(shape, dtype, dev, args, kind=kind)
            ref = None if inp is None else reference_or_none(inp, dev, args)
            if ref is None:
                del inp
                continue
            stats.append(f"{kind} {ref.describe()}")
            for r in shape_rows:
                if r.impl == "floor" or r.ms is None:
                    continue
                errs, status = accuracy_of(build_impl(r.impl, args, dev), inp, dev, ref)
                if errs is None:
                    r.extra.setdefault("acc_status", {})[kind] = status
                else:
                    r.extra.setdefault("acc", {})[kind] = errs
                    log(f"  {r.impl:>8s} on {kind} inputs: loss {errs[0]:.1e} dh {errs[1]:.1e} dW {errs[2]:.1e}")
            del inp, ref
            dev.cleanup()
        if stats:
            notes.append(f"- inputs at {shape_label(shape)}: " + "; ".join(stats) + " (fp64)")
        rows.extend(shape_rows)
    add_ratios(rows)
    return rows, notes


def bench_options(args, dev: Dev):
    """The fused op with each option on, one at a time, at one shape, same process,
    each warmed up; 'plain' (no option arguments) and 'all-off' (all of them, off) first, and
    'all-off' again last (drift)."""
    shape = parse_shapes(args.shapes)[0]
    dtype = getattr(torch, args.dtype)
    log(f"\n=== options at N={shape[0]} D={shape[1]} V={shape[2]} ({shape_label(shape)}), {args.dtype} ===")
    inp = inputs_or_none(shape, dtype, dev, args)
    names = list(OPTION_VARIANTS) + ["all-off"]
    rows = []
    for i, name in enumerate(names):
        label = name if i < len(OPTION_VARIANTS) else "all-off (again, last)"
        if inp is None:
            rows.append(Row(shape, label, status="OOM (inputs)"))
            continue
        try:
            fn = build_option_impl(name, args, dev, shape)
        except NotAvailable as e:
            rows.append(Row(shape, label, status=str(e)))
            print_row(rows[-1])
            continue
        r = run_one(label, fn, inp, dev, args)
        r.extra["args"] = OPTION_VARIANTS[name]
        del fn
        rows.append(r)
        print_row(r)
    del inp
    dev.cleanup()
    base = next((r for r in rows if r.impl == "all-off"), None)
    for r in rows:
        if base is not None and base.ms and r.ms is not None:
            r.extra["vs_off"] = r.ms / base.ms
        if base is not None and base.peak_gib is not None and r.peak_gib is not None:
            r.extra["peak_vs_off"] = r.peak_gib - base.peak_gib
    return md_table(rows, [
        ("option", lambda r: r.impl),
        ("arguments", lambda r: r.extra.get("args", "")),
        ("ms", lambda r: cell(r.ms, ".2f") if r.ms is not None else r.status),
        ("vs all-off", extra_col("vs_off", ".3f")),
        PEAK_COL,
        ("peak - all-off GiB", extra_col("peak_vs_off", "+.2f")),
        *TAIL_COLS,
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma list NxDxV (default {DEFAULT_SHAPES})")
    p.add_argument("--impls", default=",".join(ALL_IMPLS), help="comma list of " + ",".join(ALL_IMPLS))
    p.add_argument("--backend", default=None, help="fused backend (default triton on CUDA, torch on CPU)")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk_size passed to the fused op")
    p.add_argument("--chunk-budget-mib", type=int, default=None,
                   help="chunk_budget_bytes (in MiB) passed to the fused op (not fused_lean): the plan's cap")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations (first includes compile)")
    p.add_argument("--warmup-s", type=float, default=1.0,
                   help="and keep warming up this many seconds, so the clocks settle (sustained state)")
    p.add_argument("--reps", type=int, default=None, help="timed iterations (median; default 10, --sweep 5)")
    p.add_argument("--max-time-per-impl", type=float, default=8.0, help="stop timing after this many s (>=3 reps)")
    p.add_argument("--acc-max-n", type=int, default=16384, help="skip accuracy for N above this")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--ref-chunk", type=int, default=1024, help="rows per chunk of the fp64 reference")
    p.add_argument("--inputs", default="random,lm",
                   help="input kinds whose errors are reported (times: the first): random, lm (LM-like, peaked)")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum"),
                   help="of every implementation and the reference (mean: the trainer's 1/valid-tokens scale)")
    p.add_argument("--floor-chunk", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=None,
                   help="std of the logits h@W^T (W ~ N(0, s^2/D)); default: W ~ N(0, 0.02^2). "
                        "CCE's gradient filtering makes its time depend on it")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-impls", default="fused,compile",
                   help="first: the subject (fused), second: the anchor of the ratios (compile); liger too if asked")
    p.add_argument("--options", action="store_true",
                   help="the fused op with each option off and on at the 8B head (or the first of --shapes)")
    p.add_argument("--profile", action="store_true",
                   help="each kernel class's time per fwd+bwd of --sweep-impls (torch.profiler; CUDA)")
    p.add_argument("--vocab-parallel", action="store_true", help="run under torchrun --nproc_per_node 2")
    p.add_argument("--vp-shapes", default="8192x4096x128256,16384x2048x151936,32768x4096x128256")
    p.add_argument("--quick", action="store_true", help="tiny shapes, backend torch (CPU-testable)")
    p.add_argument("--allow-cpu-compile", action="store_true")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--results", default=RESULTS_LOG, help="the results log to append to")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.reps is None:
        args.reps = 5 if args.sweep else 10
    if args.quick:
        if args.shapes is None:
            args.shapes = QUICK_OPTIONS_SHAPE if args.options else QUICK_SHAPES
        args.backend = args.backend or "torch"
        args.warmup = min(args.warmup, 1)
        args.warmup_s = 0.0
        args.reps = min(args.reps, 3)
        args.acc_max_n = max(args.acc_max_n, 1 << 30)
    if args.backend is None:
        args.backend = "triton" if args.device.startswith("cuda") else "torch"
    if args.shapes is None and not args.profile:  # the profile's default: kernel_profile's
        args.shapes = OPTIONS_SHAPE if args.options else DEFAULT_SHAPES

    if args.vocab_parallel:
        return kernel_vocab_parallel.main(args)

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dev = Dev(device)
    log(f"device: {dev.name()}  torch {torch.__version__}  backend(fused)={args.backend}")
    if args.sweep:
        return kernel_sweep.main(args, dev)
    if args.profile:
        return kernel_profile.main(args, dev)
    if args.options:
        t0 = time.perf_counter()
        table = bench_options(args, dev)
        dev.emit(args, "Fused CE options: cost of each, off and on (fwd+bwd)", table, (
            f"- dtype {args.dtype}, reduction {args.reduction}, fused backend={args.backend}, random inputs, "
            f"check_labels=False in every row; warmup {args.warmup} calls and >= {args.warmup_s:g} s per row, "
            f"reps {args.reps} (median)",
            "- plain: the op called with no option argument; all-off: every option passed at its off value "
            "(vs all-off ~1.00 for plain: the off path costs nothing); each other row turns one option on. "
            "peak GiB as in the default table (beyond inputs and the grads of h and W)",
            f"- wall time: {time.perf_counter() - t0:.0f} s",
        ))
        return 0
    kinds = input_kinds(args)
    rows, notes = bench_shapes(args, dev)
    weights = (f"W ~ N(0, {W_STD}^2) (logit std {W_STD}*sqrt(D))" if args.logit_std is None
               else f"W ~ N(0, s^2/D), logit std s={args.logit_std}")
    dev.emit(args, "Kernel benchmark: LM head + CE fwd+bwd", markdown_table(rows, kinds),
             (f"- dtype {args.dtype}, reduction {args.reduction}, labels uniform with 10% ignore_index, "
              f"fused backend={args.backend}, warmup {args.warmup} calls and >= {args.warmup_s:g} s, "
              f"reps {args.reps}",
              f"- input kinds: {','.join(kinds)}; times on {kinds[0]} inputs only, errors on each kind "
              f"(N <= {args.acc_max_n})",
              DEFINITIONS.format(C=args.floor_chunk, S=weights), *notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
