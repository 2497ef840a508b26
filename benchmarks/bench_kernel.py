#!/usr/bin/env python3
"""Kernel benchmark: fused linear + cross-entropy (LM head), forward + backward.

Compares, on the SAME inputs in the SAME process:
  fused     fused_loss.fused_linear_cross_entropy(h, W, y, reduction="sum", backend=--backend)
  fused_bf16dw  the same with weight_grad_fp32=False (dW carried across chunks in bf16)
  fused_checked the same with check_labels=True (label range checked on device: a host sync)
  fused_lean    the lean setting: weight_grad_fp32=False and a 512 MiB logits budget
  eager     F.cross_entropy((h @ W.T).float(), y, reduction="sum", ignore_index=-100)
  compile   torch.compile(dynamic=False) of that same function
  liger     liger_kernel LigerFusedLinearCrossEntropyLoss(reduction="sum")(W, h, y)
  cce       cut_cross_entropy.linear_cross_entropy(h, W, y, reduction="sum")
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
  errors    relative L2 error ||x - ref|| / ||ref|| of dh, dW and the loss against an fp32
            reference (h, W upcast, TF32 off, computed in 2048-row chunks on the device).
            Skipped when N > --acc-max-n (default 16384).
  first s   wall seconds of the first call (includes torch.compile / Triton autotuning).

Modes (this file is the command line of all of them):
  default          the four shapes of issue 5 (here)
  --sweep          fused (and torch.compile) over N, V and D; how time and memory grow (kernel_sweep.py)
  --vocab-parallel run under `torchrun --nproc_per_node 2`: W sharded by vocabulary rows
                   (kernel_vocab_parallel.py)
  --quick          tiny shapes, backend torch, works on CPU (--device cpu); for the smoke test
Shared: kernel_common.py (inputs, reference, timing, columns), kernel_impls.py (the implementations).

The Markdown table is printed LAST and appended to benchmarks/log/results.md unless --no-append.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import kernel_sweep
import kernel_vocab_parallel
from bench_common import RESULTS_LOG, cell, md_table
from kernel_common import (
    PEAK_COL, TAIL_COLS, TFLOPS_COL, W_STD, Dev, NotAvailable, Row, extra_col, fp32_reference, inputs_or_none, is_oom,
    log, parse_shapes, print_row, run_one, shape_label,
)
from kernel_impls import ALL_IMPLS, ANCHOR_IMPLS, build_impl

DEFAULT_SHAPES = "8192x4096x128256,8192x2304x256000,16384x2048x151936,32768x4096x128256"
QUICK_SHAPES = "128x64x1000,256x32x2000"


def add_ratios(rows):
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r.shape, []).append(r)
    for shape, rs in by_shape.items():
        anchors = [r.ms for r in rs if r.impl in ANCHOR_IMPLS and r.ms is not None and r.status == "ok"]
        best = min(anchors) if anchors else None
        floor = next((r.ms for r in rs if r.impl == "floor" and r.ms is not None), None)
        for r in rs:
            r.extra["vs_best_anchor"] = (r.ms / best) if (best and r.ms) else None
            r.extra["vs_floor"] = (r.ms / floor) if (floor and r.ms) else None




def markdown_table(rows) -> str:
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
        ("loss rel err", lambda r: cell(r.loss_err, ".1e")),
        ("dh rel err", lambda r: cell(r.dh_err, ".1e")),
        ("dW rel err", lambda r: cell(r.dW_err, ".1e")),
        *TAIL_COLS,
    ])




DEFINITIONS = (  # one line of the results block
    "- ms: median of timed fwd+bwd iterations (CUDA events, after warm-up of each impl right "
    "before its timing, long enough for sustained clocks; grads set to None before each). "
    "peak GiB: max_memory_allocated during one fwd+bwd minus memory_allocated "
    "before it (inputs live, grads None) minus bytes of dh and dW; peak+grads GiB: the same without "
    "subtracting dh and dW. Inputs: h ~ N(0,1), "
    "{S}. Errors: relative L2 vs fp32 reference "
    "(no TF32). vs best anchor: ms / min(eager, compile, liger, cce). floor: three cuBLAS GEMMs "
    "in chunks of {C} rows."
)


def bench_shapes(args, dev: Dev):
    shapes = parse_shapes(args.shapes)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in shapes:
        N, D, V = shape
        log(f"\n=== shape N={N} D={D} V={V} ({shape_label(shape)}), {args.dtype} ===")
        dev.cleanup()
        inp = inputs_or_none(shape, dtype, dev, args)
        if inp is None:
            rows.extend(Row(shape, name, status="OOM (inputs)") for name in impls)
            continue
        ref = None
        if not args.no_accuracy and N <= args.acc_max_n:
            try:
                t0 = time.perf_counter()
                ref = fp32_reference(inp, chunk=args.ref_chunk)
                dev.sync()
                log(f"  fp32 reference: {time.perf_counter() - t0:.1f}s  loss={ref[0].item():.6e}")
            except Exception as e:
                log(f"  fp32 reference failed ({'OOM' if is_oom(e) else repr(e)[:100]}); no accuracy")
                ref = None
                dev.cleanup()
        for name in impls:
            try:
                fn = build_impl(name, args, dev)
            except NotAvailable as e:
                r = Row(shape, name, status=str(e))
                rows.append(r)
                print_row(r)
                continue
            r = run_one(name, fn, inp, dev, args, ref=ref)
            del fn
            rows.append(r)
            print_row(r)
        del inp, ref
        dev.cleanup()
    add_ratios(rows)
    return rows




def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help=f"comma list NxDxV (default {DEFAULT_SHAPES})")
    p.add_argument("--impls", default=",".join(ALL_IMPLS), help="comma list of " + ",".join(ALL_IMPLS))
    p.add_argument("--backend", default=None, help="fused backend (default triton on CUDA, torch on CPU)")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk_size passed to the fused op")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations (first includes compile)")
    p.add_argument("--warmup-s", type=float, default=1.0,
                   help="and keep warming up this many seconds, so the clocks settle (sustained state)")
    p.add_argument("--reps", type=int, default=10, help="timed iterations (median)")
    p.add_argument("--max-time-per-impl", type=float, default=8.0, help="stop timing after this many s (>=3 reps)")
    p.add_argument("--acc-max-n", type=int, default=16384, help="skip accuracy for N above this")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--ref-chunk", type=int, default=2048)
    p.add_argument("--floor-chunk", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-std", type=float, default=None,
                   help="std of the logits h@W^T (W ~ N(0, s^2/D)); default: W ~ N(0, 0.02^2). "
                        "CCE's gradient filtering makes its time depend on it")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-impls", default="fused,compile")
    p.add_argument("--vocab-parallel", action="store_true", help="run under torchrun --nproc_per_node 2")
    p.add_argument("--vp-shapes", default="8192x4096x128256,16384x2048x151936,32768x4096x128256")
    p.add_argument("--quick", action="store_true", help="tiny shapes, backend torch (CPU-testable)")
    p.add_argument("--allow-cpu-compile", action="store_true")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--results", default=RESULTS_LOG, help="the results log to append to")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        if args.shapes is None:
            args.shapes = QUICK_SHAPES
        args.backend = args.backend or "torch"
        args.warmup = min(args.warmup, 1)
        args.warmup_s = 0.0
        args.reps = min(args.reps, 3)
        args.acc_max_n = max(args.acc_max_n, 1 << 30)
    if args.backend is None:
        args.backend = "triton" if args.device.startswith("cuda") else "torch"
    if args.shapes is None:
        args.shapes = DEFAULT_SHAPES

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
    rows = bench_shapes(args, dev)
    weights = (f"W ~ N(0, {W_STD}^2) (logit std {W_STD}*sqrt(D))" if args.logit_std is None
               else f"W ~ N(0, s^2/D), logit std s={args.logit_std}")
    dev.emit(args, "Kernel benchmark: LM head + CE fwd+bwd", markdown_table(rows),
             (f"- dtype {args.dtype}, labels uniform with 10% ignore_index, fused backend={args.backend}, "
              f"warmup {args.warmup} calls and >= {args.warmup_s:g} s, reps {args.reps}",
              DEFINITIONS.format(C=args.floor_chunk, S=weights)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
