"""Kernel benchmark, sweep mode (``bench_kernel.py --sweep``): the fused op (and
torch.compile) over N, V and D at fixed other dimensions; how time and memory grow against the
first point of each axis (a FLOP ratio beside it).
"""
from __future__ import annotations

import torch

from bench_common import cell, md_table
from kernel_common import PEAK_COL, TAIL_COLS, TFLOPS_COL, NotAvailable, Row, extra_col, inputs_or_none, log, print_row, run_one
from kernel_impls import build_impl


def sweep(args, dev) -> str:
    """The growth table (Markdown)."""
    dtype = getattr(torch, args.dtype)
    if args.quick:
        pts = [("N", (n, 64, 1000)) for n in (128, 256, 512)] + [("V", (256, 64, v)) for v in (500, 2000)]
    else:
        pts = [("N", (n, 4096, 128256)) for n in (2048, 8192, 32768, 65536)]
        pts += [("V", (8192, 4096, v)) for v in (32000, 128256, 256000)]
        pts += [("D", (8192, d, 128256)) for d in (2048, 4096, 8192)]
    impls = [s.strip() for s in args.sweep_impls.split(",") if s.strip()]
    rows = []
    cache = {}
    for axis, shape in pts:
        N, D, V = shape
        log(f"\n=== sweep {axis}: N={N} D={D} V={V} ===")
        key = shape
        results = cache.get(key)
        if results is None:
            results = []
            dev.cleanup()
            inp = inputs_or_none(shape, dtype, dev, args)
            for name in impls:
                if inp is None:
                    results.append(Row(shape, name, status="OOM (inputs)"))
                    continue
                try:
                    fn = build_impl(name, args, dev)
                except NotAvailable as e:
                    results.append(Row(shape, name, status=str(e)))
                    continue
                results.append(run_one(name, fn, inp, dev, args))
                print_row(results[-1])
            del inp
            dev.cleanup()
            cache[key] = results
        for r in results:
            r2 = Row(**{**r.__dict__, "extra": dict(r.extra)})
            r2.extra["axis"] = axis
            rows.append(r2)
    # growth relative to the first point of each axis, per impl
    first = {}
    for r in rows:
        k = (r.extra["axis"], r.impl)
        if k not in first and r.ms is not None:
            first[k] = r
    for r in rows:
        f0 = first.get((r.extra["axis"], r.impl))
        if f0 is not None and r.ms is not None:
            flop_ratio = (r.shape[0] * r.shape[1] * r.shape[2]) / (f0.shape[0] * f0.shape[1] * f0.shape[2])
            r.extra["time_growth"] = r.ms / f0.ms
            r.extra["flop_growth"] = flop_ratio
            if r.peak_gib is not None and f0.peak_gib is not None:
                r.extra["mem_growth"] = r.peak_gib / f0.peak_gib if f0.peak_gib > 0 else None
    return sweep_table(rows)


def sweep_table(rows) -> str:
    return md_table(rows, [
        ("axis", lambda r: r.extra["axis"]),
        ("N", lambda r: str(r.shape[0])),
        ("D", lambda r: str(r.shape[1])),
        ("V", lambda r: str(r.shape[2])),
        ("impl", lambda r: r.impl),
        ("ms", lambda r: cell(r.ms, ".2f") if r.ms is not None else r.status),
        TFLOPS_COL,
        ("time x (vs first)", extra_col("time_growth", ".2f")),
        ("FLOP x", extra_col("flop_growth", ".2f")),
        PEAK_COL,
        ("peak x", extra_col("mem_growth", ".2f")),
        *TAIL_COLS,
    ])


def main(args, dev) -> int:
    table = sweep(args, dev)
    dev.emit(args, "Fused CE sweep (fwd+bwd)", table, (f"- impls: {args.sweep_impls}; dtype {args.dtype}",))
    return 0
