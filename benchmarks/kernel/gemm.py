"""One chunk's logits and row passes, path against path (CUDA): the "epilogue" path's Triton GEMM
(fused_loss.epilogue_triton) under candidate tile configurations, against the "vendor" path
(cuBLAS's mm, then the Triton row pass) and cuBLAS's mm alone, at the chunk shapes the plan
picks for the sweep's heads. Each timing is the median of --reps after >= --warmup-s seconds
of back-to-back calls (sustained clocks). Prints one table; chooses nothing by itself: the
chosen configuration is written into epilogue_triton.GEMM_CONFIG by hand (benchmarks/NOTES.md).

    python -m benchmarks.kernel.gemm [--shapes CxDxV,...] [--configs all|default|none]
                                     [--schedules candidates|none|CONSUMERSxCHAIN[skewBLOCKS],...]

--schedules times other consumer schedules of the Gluon GEMM (epilogue_gluon.Schedule) beside
the op's: its CANDIDATES by default, or those named (2x2skew1: two consumers, chains of 2
blocks, the second a block behind), each also held to fp64 by its tile maxima.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fused_loss import epilogue_gluon, epilogue_triton, rows_triton
from fused_loss.options import LossOptions

# chunk shapes (rows, D, V) of the plan at the default cap for the sweep's heads
DEFAULT_SHAPES = "8192x4096x128256,3328x2048x151936,2048x2304x256000"
CONFIGS = [
    dict(BM=128, BN=256, BK=64, GROUP_M=16, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=4, num_stages=3),
    dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=8, num_stages=4),
]


def timed(fn, warmup_s, reps):
    # one call at a time: unsynchronized calls queue up (~1000 launches deep), and the warm-up
    # would run that queue's length, not warmup_s (12 s at the 8B chunk)
    fn()  # a first call compiles (seconds for a Gluon schedule): no part of the warm-up
    torch.cuda.synchronize()
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def parse_schedules(spec: str) -> list[epilogue_gluon.Schedule]:
    if spec in ("candidates", "none"):
        return list(epilogue_gluon.CANDIDATES) if spec == "candidates" else []
    try:
        return [epilogue_gluon.Schedule.from_name(name) for name in spec.split(",")]
    except ValueError as e:
        raise SystemExit(f"--schedules: {e}")


def tile_max_error(chunk, h, w, rows: int = 256) -> float:
    """The worst |partial max - fp64's| over the first rows' tiles (the raw logits' maxima:
    what promotion makes exact to fp32)."""
    z = h[:rows].double() @ w.double().t()
    n_tiles = chunk.partials.shape[1]
    z = torch.nn.functional.pad(z, (0, n_tiles * chunk.bn - z.shape[1]), value=-float("inf"))
    exact = z.view(z.shape[0], n_tiles, chunk.bn).amax(-1)
    return float((chunk.partials[:rows, :, 0].double() - exact).abs().max())


def _exact_lse_and_target(h, w, y):
    z = h.double() @ w.double().t()
    return torch.logsumexp(z, 1), z.gather(1, y[:, None]).squeeze(1)


def accuracy_probe() -> str:
    g = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for dtype, (m, d, v), peaked in ((torch.float16, (512, 4096, 128256), True),
                                     (torch.bfloat16, (2048, 2304, 256000), False)):
        w = torch.randn(v, d, device="cuda", generator=g) / d ** 0.5
        y = torch.randint(0, v, (m,), device="cuda", generator=g)
        h = torch.randn(m, d, device="cuda", generator=g)
        if peaked:  # the label's logit ~15 above the noise
            h = h / (w * w).sum(1).mean().sqrt() + 15 * w[y] / (w[y] * w[y]).sum(1, keepdim=True)
        h, w = h.to(dtype), w.to(dtype)
        opts = LossOptions(vocab_size=v)
        buf = torch.empty(m, v, device="cuda", dtype=dtype)
        stats = epilogue_triton.row_stats(epilogue_triton.logits(h, w, None, y, buf, opts), y, opts)
        lse = stats[:, 0].double() + stats[:, 1].double().log()
        exact, target = _exact_lse_and_target(h, w, y)
        if peaked:
            out.append(f"lse max err {float((lse - exact).abs().max()):.1e}")
        else:
            bias = float(((lse - stats[:, 2].double()) - (exact - target)).mean())
            out.append(f"loss bias {bias:.1e}")
    return ", ".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES)
    p.add_argument("--configs", default="all", choices=("all", "default", "none"))
    p.add_argument("--schedules", default="candidates",
                   help="other consumer schedules of the Gluon GEMM to time beside the op's: "
                        "candidates (epilogue_gluon.CANDIDATES), none, or e.g. 2x2skew1,2x1")
    p.add_argument("--warmup-s", type=float, default=0.3)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    configs = {"all": CONFIGS, "default": [epilogue_triton.GEMM_CONFIG], "none": []}[args.configs]
    schedules = parse_schedules(args.schedules)
    default = dict(epilogue_triton.GEMM_CONFIG)
    rows = []
    for spec in args.shapes.split(","):
        c, d, v = (int(x) for x in spec.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(c, d, device="cuda", generator=g).bfloat16()
        w = (torch.randn(v, d, device="cuda", generator=g) * 0.02).bfloat16()
        y = torch.randint(0, v, (c,), device="cuda", generator=g)
        buf = torch.empty(c, v, device="cuda", dtype=torch.bfloat16)
        opts = LossOptions(vocab_size=v)
        one = torch.ones((), device="cuda")
        flops = 2 * c * d * v
        mm = timed(lambda: torch.mm(h, w.t(), out=buf), args.warmup_s, args.reps)
        vendor = timed(lambda: rows_triton.row_stats_and_grad_(
            rows_triton.vendor_chunk(h, w, None, y, buf, opts), y, one, opts), args.warmup_s, args.reps)
        line = [f"{c}x{d}x{v}", f"{mm:.3f} ({flops / mm / 1e9:.0f} TF/s)", f"{vendor:.3f}"]
        for cfg in configs:
            epilogue_triton.GEMM_CONFIG = cfg
            try:
                gemm = timed(lambda: epilogue_triton.logits(h, w, None, y, buf, opts),
                             args.warmup_s, args.reps)
                path = timed(lambda: epilogue_triton.row_stats_and_grad_(
                    epilogue_triton.logits(h, w, None, y, buf, opts), y, one, opts),
                    args.warmup_s, args.reps)
                line.append(f"{gemm:.3f} ({gemm / mm:.3f}x) / {path:.3f} ({path / vendor:.3f}x)")
            except Exception as e:  # a configuration that does not fit (shared memory)
                line.append(f"{type(e).__name__}")
            print(" | ".join(line), flush=True)
        epilogue_triton.GEMM_CONFIG = default
        gemm = timed(lambda: epilogue_gluon.logits(h, w, None, y, buf, opts), args.warmup_s,
                     args.reps)
        path = timed(lambda: epilogue_triton.row_stats_and_grad_(
            epilogue_gluon.logits(h, w, None, y, buf, opts), y, one, opts), args.warmup_s, args.reps)
        line.append(f"{gemm:.3f} ({gemm / mm:.3f}x) / {path:.3f} ({path / vendor:.3f}x)")
        for schedule in (epilogue_gluon.SCHEDULE, *schedules):
            def run():
                return epilogue_gluon.logits(h, w, None, y, buf, opts, schedule=schedule)
            if schedule != epilogue_gluon.SCHEDULE:
                gemm = timed(run, args.warmup_s, args.reps)
                line.append(f"{gemm:.3f} ({gemm / mm:.3f}x)")
            line.append(f"{tile_max_error(run(), h, w):.1e}")
        print(" | ".join(line), flush=True)
        rows.append(line)
        h = w = buf = None  # freed before the next shape allocates
        torch.cuda.empty_cache()
    # accuracy per configuration: the worst |lse - exact| of fp16 LM-like rows at D=4096 (the
    # tensor cores' truncating accumulation grows with K), and the mean signed loss error per
    # row of bf16 random rows (a bias, where rounding errors would cancel)
    acc_line = ["accuracy", "", ""]
    for cfg in configs:
        epilogue_triton.GEMM_CONFIG = cfg
        acc_line.append(accuracy_probe())
    epilogue_triton.GEMM_CONFIG = default
    acc_line.append("(GPU tests: = the Triton GEMM's)")
    acc_line += [""] * (1 + 2 * len(schedules))
    rows.append(acc_line)
    head = ["chunk CxDxV", "cuBLAS mm ms", "vendor path ms"] + [
        "BM{BM} BN{BN} BK{BK} G{GROUP_M} w{num_warps} s{num_stages}: GEMM / path ms".format(**c)
        for c in configs] + [
        f"Gluon, the op's schedule {epilogue_gluon.SCHEDULE.name}: GEMM / path ms",
        "its tile-max err"]
    for s in schedules:
        head += [f"schedule {s.name}: GEMM ms", f"{s.name} tile-max err"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for line in rows:
        print("| " + " | ".join(line) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
