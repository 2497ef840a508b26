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

Definitions (also printed into RESULTS.md):
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

Modes:
  default          the four shapes from ANCHORS.md
  --sweep          fused (and torch.compile) over N, V and D; prints how time and memory grow
  --vocab-parallel run under `torchrun --nproc_per_node 2`: W sharded by vocabulary rows
  --quick          tiny shapes, backend torch, works on CPU (--device cpu); for the smoke test

The Markdown table is printed LAST and appended to benchmarks/RESULTS.md unless --no-append.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from results import append_results  # benchmarks/results.py (scripts run from this folder)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

IGNORE = -100
DEFAULT_SHAPES = "8192x4096x128256,8192x2304x256000,16384x2048x151936,32768x4096x128256"
QUICK_SHAPES = "128x64x1000,256x32x2000"
SHAPE_NAMES = {
    (8192, 4096, 128256): "Llama-3-8B head",
    (8192, 2304, 256000): "Gemma-2-2B head",
    (16384, 2048, 151936): "Qwen3-1.7B head",
    (32768, 4096, 128256): "Llama-3-8B head",
}
ANCHOR_IMPLS = ("eager", "compile", "liger", "cce")
ALL_IMPLS = ("fused", "fused_bf16dw", "fused_checked", "fused_lean", "eager", "compile", "liger", "cce", "floor")


def log(*a):
    print(*a, flush=True)


def parse_shapes(s: str):
    out = []
    for tok in s.split(","):
        tok = tok.strip()
        if not tok:
            continue
        n, d, v = (int(x) for x in tok.lower().split("x"))
        out.append((n, d, v))
    return out


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        try:
            m = importlib.import_module(name.replace("-", "_"))
            return getattr(m, "__version__", "installed (no version)")
        except Exception:
            return "not installed"


def fmt(x, spec=".2f"):
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return format(x, spec)


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------
class Dev:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def cleanup(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def allocated(self):
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else 0

    def name(self):
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return "out of memory" in msg.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in msg


# --------------------------------------------------------------------------------------
# inputs and fp32 reference
# --------------------------------------------------------------------------------------
@dataclass
class Inputs:
    h: torch.Tensor
    W: torch.Tensor
    y: torch.Tensor


LOGIT_STD = None  # None: W ~ N(0, W_STD^2), the usual LM-head init; logits std = W_STD * sqrt(D)
W_STD = 0.02


def make_inputs(N, D, V, dtype, device, seed=0, ignore_frac=0.1, logit_std=None) -> Inputs:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    # h ~ N(0,1); W ~ N(0, 0.02^2) (logit std 0.02*sqrt(D): 1.28 at D=4096, 0.96 at D=2304), or
    # W ~ N(0, s^2/D) so that the logits have std s when --logit-std s is given.
    # CCE's gradient filtering makes its time depend strongly on this (H200, 8B head: 47 ms at
    # logit std 0.5, 143 ms at 1.5); the other impls do not care.
    s = LOGIT_STD if logit_std is None else logit_std
    w_scale = W_STD if s is None else s / math.sqrt(D)
    h = torch.randn(N, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    W = (torch.randn(V, D, generator=g, device=device, dtype=torch.float32) * w_scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g, device=device, dtype=torch.int64)
    mask = torch.rand(N, generator=g, device=device) < ignore_frac
    y = y.masked_fill(mask, IGNORE)
    h.requires_grad_(True)
    W.requires_grad_(True)
    return Inputs(h, W, y)


@torch.no_grad()
def inputs_or_none(shape, dtype, dev, seed) -> Inputs | None:
    """The benchmark inputs, or None when they alone do not fit in memory."""
    try:
        return make_inputs(*shape, dtype, dev.device, seed=seed)
    except Exception as e:
        if not is_oom(e):
            raise
        return None


def fp32_reference(inp: Inputs, chunk=2048):
    """Loss (float64 scalar), dh [N,D] fp32, dW [V,D] fp32 of sum-reduced CE, h/W upcast, no TF32."""
    h, W, y = inp.h.detach(), inp.W.detach(), inp.y
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    old_prec = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        Wf = W.float()
        dW = torch.zeros_like(Wf)
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        loss = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk].float()
            yc = y[s : s + chunk]
            z = hc @ Wf.T
            lse = torch.logsumexp(z, dim=1)
            valid = yc != IGNORE
            yv = yc.clamp_min(0)
            tgt = z.gather(1, yv[:, None]).squeeze(1)
            loss += ((lse - tgt) * valid).double().sum()
            z.sub_(lse[:, None]).exp_()  # softmax in place
            z[torch.arange(z.shape[0], device=z.device), yv] -= 1.0
            z.mul_(valid[:, None].float())
            dh[s : s + chunk] = z @ Wf
            dW.addmm_(z.T, hc)
            del z
        return loss, dh, dW
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.set_float32_matmul_precision(old_prec)


@torch.no_grad()
def rel_l2(x: torch.Tensor, ref: torch.Tensor, chunk_rows=8192) -> float:
    if x is None:
        return float("nan")
    num = torch.zeros((), dtype=torch.float64, device=ref.device)
    den = torch.zeros((), dtype=torch.float64, device=ref.device)
    for s in range(0, ref.shape[0], chunk_rows):
        r = ref[s : s + chunk_rows]
        d = x[s : s + chunk_rows].float() - r
        num += (d.double() ** 2).sum()
        den += (r.double() ** 2).sum()
    return float((num.sqrt() / den.sqrt()).item())


# --------------------------------------------------------------------------------------
# implementations: each returns a callable step(inp) -> loss tensor (backward done inside)
# --------------------------------------------------------------------------------------
def md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


class NotAvailable(Exception):
    pass


def _eager_fn(h, W, y):
    return F.cross_entropy((h @ W.T).float(), y, reduction="sum", ignore_index=IGNORE)


_COMPILED = None


def _compiled_fn():
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo as dynamo

        for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo.config, k):
                setattr(dynamo.config, k, max(getattr(dynamo.config, k), 256))
        _COMPILED = torch.compile(_eager_fn, dynamic=False)
    return _COMPILED


def _cuda_import(dev: Dev, module: str, attr: str):
    """An anchor library's entry point; NotAvailable (a table cell, not a crash) off CUDA or when
    the library is missing."""
    if not dev.cuda:
        raise NotAvailable("n/a (needs CUDA)")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise NotAvailable(f"n/a ({type(e).__name__})")


def build_impl(name: str, args, dev: Dev, process_group=None, vocab_start=0, vocab_size=None):
    """Return fn(h, W, y) -> loss (autograd) or, for 'floor', fn(h, W, y) -> None doing GEMMs."""
    # fused_bf16dw: dW carried in bf16 across chunks; fused_checked: the op checks the label
    # range itself (one host sync); the trainer checks the CPU batch and passes False, as here
    # fused_lean: both memory knobs down (bf16 dW carry, half the default logits budget)
    if name in ("fused", "fused_bf16dw", "fused_checked", "fused_lean"):
        try:
            from fused_loss import fused_linear_cross_entropy
        except Exception as e:  # module not there or broken
            raise NotAvailable(f"n/a ({type(e).__name__}: {str(e)[:60]})")
        backend = args.backend
        kw = dict(reduction="sum", backend=backend, ignore_index=IGNORE,
                  weight_grad_fp32=name not in ("fused_bf16dw", "fused_lean"),
                  check_labels=name == "fused_checked")
        if name == "fused_lean":
            kw["chunk_budget_bytes"] = 512 << 20
        if args.chunk_size:
            kw["chunk_size"] = args.chunk_size
        if process_group is not None:
            kw.update(process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size)

        def fused(h, W, y):
            return fused_linear_cross_entropy(h, W, y, **kw)

        return fused
    if name == "eager":
        return _eager_fn
    if name == "compile":
        if not dev.cuda and not args.allow_cpu_compile:
            raise NotAvailable("n/a (CPU; --allow-cpu-compile)")
        return _compiled_fn()
    if name == "liger":
        loss_cls = _cuda_import(dev, "liger_kernel.transformers.fused_linear_cross_entropy",
                                "LigerFusedLinearCrossEntropyLoss")
        mod = loss_cls(reduction="sum", ignore_index=IGNORE)
        return lambda h, W, y: mod(W, h, y)  # Liger takes the weight first
    if name == "cce":
        cce = _cuda_import(dev, "cut_cross_entropy", "linear_cross_entropy")
        return lambda h, W, y: cce(h, W, y, ignore_index=IGNORE, reduction="sum")
    if name == "floor":
        C = args.floor_chunk
        state = {}

        @torch.no_grad()
        def floor(h, W, y):
            N, D = h.shape
            V = W.shape[0]
            c0 = min(C, N)
            z = state.get("z")
            if z is None or z.shape != (c0, V) or z.dtype != h.dtype:
                z = state["z"] = torch.empty(c0, V, dtype=h.dtype, device=h.device)
            dh = torch.empty_like(h)
            dW = torch.empty_like(W)
            Wt = W.t()
            for i, s in enumerate(range(0, N, C)):
                hc = h[s : s + C]
                zc = z[: hc.shape[0]]
                torch.mm(hc, Wt, out=zc)
                torch.mm(zc, W, out=dh[s : s + C])
                if i == 0:
                    torch.mm(zc.t(), hc, out=dW)
                else:
                    dW.addmm_(zc.t(), hc)
            # hand the results over like autograd would
            h.grad, W.grad = dh, dW
            return None

        floor.release = lambda: state.clear()
        return floor
    raise ValueError(f"unknown impl {name}")


@dataclass
class Row:
    shape: tuple
    impl: str
    ms: float | None = None
    ms_all: list = field(default_factory=list)
    status: str = "ok"
    peak_gib: float | None = None
    loss_err: float | None = None
    dh_err: float | None = None
    dW_err: float | None = None
    first_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tflops(self):
        if self.ms is None:
            return None
        N, D, V = self.shape
        return 6.0 * N * D * V / (self.ms * 1e-3) / 1e12


def run_one(name, fn, inp: Inputs, dev: Dev, args, ref=None, post=None) -> Row:
    """Time fn on inp. post(h, W) -> optional hook run on the measured grads (e.g. all-reduce)."""
    N, D = inp.h.shape
    V = inp.W.shape[0]
    row = Row((N, D, V), name)
    h, W, y = inp.h, inp.W, inp.y
    is_floor = name == "floor"

    def step():
        h.grad = None
        W.grad = None
        out = fn(h, W, y)
        if not is_floor:
            out.backward()
        if post is not None:
            post(h, W)
        return out

    try:
        dev.cleanup()
        t0 = time.perf_counter()
        loss = step()
        dev.sync()
        row.first_s = time.perf_counter() - t0
        del loss
        # at least --warmup calls and --warmup-s seconds back to back: a few calls after lighter
        # work run at boost clocks, a training job at the power-limited sustained ones (cuBLAS
        # read 795 TFLOP/s cold, 678 sustained: benchmarks/NOTES.md attempt 11)
        warm_until = time.perf_counter() + args.warmup_s
        calls = 1
        while calls < args.warmup or time.perf_counter() < warm_until:
            step()
            dev.sync()
            calls += 1
        times = []
        t_budget = time.perf_counter() + args.max_time_per_impl
        for i in range(args.reps):
            h.grad = None
            W.grad = None
            if dev.cuda:
                e0 = torch.cuda.Event(enable_timing=True)
                e1 = torch.cuda.Event(enable_timing=True)
                e0.record()
                out = step()
                e1.record()
                del out
                e1.synchronize()
                times.append(e0.elapsed_time(e1))
            else:
                t0 = time.perf_counter()
                out = step()
                times.append((time.perf_counter() - t0) * 1e3)
                del out
            if i >= 2 and time.perf_counter() > t_budget:
                break
        row.ms_all = times
        row.ms = statistics.median(times)
        # peak memory of one more fwd+bwd (persistent buffers of the impl released first)
        h.grad = None
        W.grad = None
        if hasattr(fn, "release"):
            fn.release()
        dev.cleanup()
        base = dev.allocated()
        dev.reset_peak()
        out = step()
        dev.sync()
        if dev.cuda:
            grad_bytes = h.numel() * h.element_size() + W.numel() * W.element_size()
            row.peak_gib = (dev.peak() - base - grad_bytes) / 2**30
            row.extra["peak_incl_grads"] = (dev.peak() - base) / 2**30
        # accuracy on the grads of that last step
        if ref is not None and not is_floor:
            loss_ref, dh_ref, dW_ref = ref
            lv = float(out.detach().double().item())
            row.loss_err = abs(lv - float(loss_ref.item())) / max(abs(float(loss_ref.item())), 1e-30)
            row.dh_err = rel_l2(h.grad, dh_ref)
            row.dW_err = rel_l2(W.grad, dW_ref)
            if not math.isfinite(lv):
                row.status = "NaN loss"
        del out
    except NotAvailable as e:
        row.status = str(e)
    except Exception as e:
        if is_oom(e):
            row.status = "OOM"
        else:
            row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            traceback.print_exc()
    finally:
        h.grad = None
        W.grad = None
        if hasattr(fn, "release"):
            fn.release()
        dev.cleanup()
    return row


# --------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------
def shape_label(shape):
    N, D, V = shape
    nm = SHAPE_NAMES.get(shape)
    return f"{nm} ({N}, {D}, {V})" if nm else f"({N}, {D}, {V})"


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


def md_table(rows, columns) -> str:
    """A Markdown table with one (header, cell(row) -> str) pair per column."""
    lines = [md_row([header for header, _ in columns]), "|" + "---|" * len(columns)]
    lines += [md_row([cell(r) for _, cell in columns]) for r in rows]
    return "\n".join(lines)


# the columns both tables show, formatted alike
TFLOPS_COL = ("TFLOP/s", lambda r: fmt(r.tflops, ".0f"))
PEAK_COL = ("peak GiB", lambda r: fmt(r.peak_gib, ".2f"))
TAIL_COLS = [("first call s", lambda r: fmt(r.first_s, ".1f")), ("status", lambda r: r.status)]


def _extra(key, spec):
    return lambda r: fmt(r.extra.get(key), spec)


def markdown_table(rows) -> str:
    # the shape is named on its first row only
    named = {id(r) for i, r in enumerate(rows) if i == 0 or rows[i - 1].shape != r.shape}
    return md_table(rows, [
        ("shape (N, D, V)", lambda r: shape_label(r.shape) if id(r) in named else ""),
        ("impl", lambda r: r.impl),
        ("ms", lambda r: fmt(r.ms) if r.ms is not None else (r.status if r.status != "ok" else "")),
        TFLOPS_COL,
        ("vs best anchor", _extra("vs_best_anchor", ".3f")),
        ("vs GEMM floor", _extra("vs_floor", ".3f")),
        PEAK_COL,
        ("peak+grads GiB", _extra("peak_incl_grads", ".2f")),
        ("loss rel err", lambda r: fmt(r.loss_err, ".1e")),
        ("dh rel err", lambda r: fmt(r.dh_err, ".1e")),
        ("dW rel err", lambda r: fmt(r.dW_err, ".1e")),
        *TAIL_COLS,
    ])


def sweep_table(rows) -> str:
    return md_table(rows, [
        ("axis", lambda r: r.extra["axis"]),
        ("N", lambda r: str(r.shape[0])),
        ("D", lambda r: str(r.shape[1])),
        ("V", lambda r: str(r.shape[2])),
        ("impl", lambda r: r.impl),
        ("ms", lambda r: fmt(r.ms) if r.ms is not None else r.status),
        TFLOPS_COL,
        ("time x (vs first)", _extra("time_growth", ".2f")),
        ("FLOP x", _extra("flop_growth", ".2f")),
        PEAK_COL,
        ("peak x", _extra("mem_growth", ".2f")),
        *TAIL_COLS,
    ])


def print_row(r: Row):
    log(
        f"  {r.impl:>8s}: "
        + (f"{r.ms:9.2f} ms  {r.tflops:6.0f} TFLOP/s" if r.ms is not None else f"{r.status:>26s}")
        + (f"  peak {r.peak_gib:6.2f} GiB" if r.peak_gib is not None else "")
        + (f"  loss {r.loss_err:.1e} dh {r.dh_err:.1e} dW {r.dW_err:.1e}" if r.dh_err is not None else "")
        + (f"  first {r.first_s:.1f}s" if r.first_s is not None else "")
        + (f"  [{r.status}]" if r.status != "ok" and r.ms is not None else "")
    )


def header_block(dev: Dev, title: str, extra_lines=()) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    lines = [
        f"## {title} — {now}",
        "",
        f"- device: {dev.name()}",
        f"- torch {torch.__version__}, triton {tv}, liger-kernel {pkg_version('liger_kernel')}, "
        f"cut-cross-entropy {pkg_version('cut_cross_entropy')}",
        f"- command: `{' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`",
        *extra_lines,
        "",
        "",
    ]
    return "\n".join(lines)


def emit(table: str, dev: Dev, args, title: str, notes=()):
    block = header_block(dev, title, notes) + table + "\n"
    if not args.no_append:
        append_results(block, args.results)
        log(f"(appended to {args.results})")
    log("")
    log(block)


DEFINITIONS = (
    "- ms: median of timed fwd+bwd iterations (CUDA events, after warm-up of each impl right "
    "before its timing, long enough for sustained clocks; grads set to None before each). "
    "peak GiB: max_memory_allocated during one fwd+bwd minus memory_allocated "
    "before it (inputs live, grads None) minus bytes of dh and dW; peak+grads GiB: the same without "
    "subtracting dh and dW (what ANCHORS.md's 'peak' column measured). Inputs: h ~ N(0,1), "
    "{S}. Errors: relative L2 vs fp32 reference "
    "(no TF32). vs best anchor: ms / min(eager, compile, liger, cce). floor: three cuBLAS GEMMs "
    "in chunks of {C} rows.",
)


# --------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------
def bench_shapes(args, dev: Dev):
    shapes = parse_shapes(args.shapes)
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    dtype = getattr(torch, args.dtype)
    rows = []
    for shape in shapes:
        N, D, V = shape
        log(f"\n=== shape N={N} D={D} V={V} ({shape_label(shape)}), {args.dtype} ===")
        dev.cleanup()
        inp = inputs_or_none(shape, dtype, dev, args.seed)
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


def sweep(args, dev: Dev):
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
            inp = inputs_or_none(shape, dtype, dev, args.seed)
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


def vocab_parallel(args):
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    dev = Dev(device)
    if rank != 0:
        args.no_append = True
    dtype = getattr(torch, args.dtype)
    # every rank must run the same number of iterations (the op has collectives inside)
    args.max_time_per_impl = float("inf")
    shapes = parse_shapes(args.vp_shapes if not args.quick else "256x64x1000")
    rows = []

    def say(*a):
        if rank == 0:
            log(*a)

    for shape in shapes:
        N, D, V = shape
        if V % world:
            say(f"skip {shape}: V not divisible by world {world}")
            continue
        Vl = V // world
        say(f"\n=== vocab-parallel N={N} D={D} V={V}, world={world}, V_local={Vl} ===")
        res = {}
        # 1) single-GPU with the full W (all ranks run it on their own GPU; rank 0 reports)
        inp = make_inputs(N, D, V, dtype, device, seed=args.seed)
        try:
            fn = build_impl("fused", args, dev)
        except NotAvailable as e:
            say(f"fused op not available: {e}")
            rows.append((shape, "single GPU, full W", None, None, str(e), None, None, (None, None, None)))
            del inp
            dist.barrier()
            continue
        dist.barrier()
        r1 = run_one("fused", fn, inp, dev, args)
        # the single-GPU op's loss and grads: reference for the parallel correctness check
        inp.h.grad = inp.W.grad = None
        loss_single = fn(inp.h, inp.W, inp.y)
        loss_single.backward()
        dh_single = inp.h.grad.detach().float()
        dW_single = inp.W.grad.detach()[rank * Vl : (rank + 1) * Vl].float()
        loss_single = loss_single.detach().double()
        W_local = inp.W.detach()[rank * Vl : (rank + 1) * Vl].clone().requires_grad_(True)
        h_local = inp.h.detach().clone().requires_grad_(True)
        y = inp.y
        del inp
        dev.cleanup()
        # 2) vocab-parallel
        pg = dist.group.WORLD
        fnp = build_impl("fused", args, dev, process_group=pg, vocab_start=rank * Vl, vocab_size=V)
        pinp = Inputs(h_local, W_local, y)
        dist.barrier()
        r2 = run_one("fused", fnp, pinp, dev, args)

        def allreduce_dh(h, W):
            dist.all_reduce(h.grad)

        dist.barrier()
        r3 = run_one("fused", fnp, pinp, dev, args, post=allreduce_dh)
        # correctness of the parallel result vs the single-GPU op
        errs = (None, None, None)
        try:
            pinp.h.grad = pinp.W.grad = None
            lp = fnp(pinp.h, pinp.W, y)
            lp.backward()
            dh = pinp.h.grad.detach().clone()
            dist.all_reduce(dh)
            errs = (
                abs(float(lp.detach().double().item()) - float(loss_single.item())) / max(abs(float(loss_single.item())), 1e-30),
                rel_l2(dh, dh_single),
                rel_l2(pinp.W.grad, dW_single),
            )
        except Exception as e:
            say(f"  parallel correctness check failed: {type(e).__name__}: {e}")
        pinp.h.grad = pinp.W.grad = None
        # times: max over ranks
        for tag, r in (("single GPU, full W", r1), (f"TP={world} op only", r2), (f"TP={world} op + all_reduce(dh)", r3)):
            t = torch.tensor([r.ms if r.ms is not None else float("nan")], device=device, dtype=torch.float64)
            tmax = t.clone()
            dist.all_reduce(tmax, op=dist.ReduceOp.MAX)
            pk = torch.tensor([r.peak_gib if r.peak_gib is not None else float("nan")], device=device, dtype=torch.float64)
            dist.all_reduce(pk, op=dist.ReduceOp.MAX)
            if tag.startswith("single"):
                rows.append((shape, tag, r.ms, r.ms, r.status, r.peak_gib, None, (None, None, None)))
            else:
                rows.append((shape, tag, r.ms, float(tmax.item()), r.status, float(pk.item()), None, errs))
        single_ms = r1.ms
        for i in range(len(rows)):
            s, tag, ms0, msmax, st, pk, _, e = rows[i]
            if s == shape and single_ms and msmax:
                rows[i] = (s, tag, ms0, msmax, st, pk, msmax / single_ms, e)
        say(f"  single {fmt(r1.ms)} ms | TP op {fmt(r2.ms)} ms (rank0) | TP op+allreduce {fmt(r3.ms)} ms | errs {errs}")
        del pinp, h_local, W_local, fn, fnp, dh_single, dW_single
        dev.cleanup()
        dist.barrier()
    hdr = ("| shape (N, D, V) | run | ms rank0 | ms max over ranks | x single GPU (goal <= 0.6) "
           "| peak GiB (max rank) | loss rel err vs single | dh rel err | dW_local rel err | status |")
    lines = [hdr, "|" + "---|" * 10]
    for s, tag, ms0, msmax, st, pk, ratio, e in rows:
        lines.append(
            f"| {shape_label(s)} | {tag} | {fmt(ms0)} | {fmt(msmax)} | {fmt(ratio, '.3f')} | {fmt(pk)} "
            f"| {fmt(e[0], '.1e')} | {fmt(e[1], '.1e')} | {fmt(e[2], '.1e')} | {st} |"
        )
    table = "\n".join(lines)
    if rank == 0:
        emit(table, dev, args, f"Vocab-parallel fused CE, world={world}",
             ("- per-rank W = V/world rows; process_group=WORLD; times are fwd+bwd medians (CUDA events).",
              "- 'x single GPU' = max-over-ranks time / single-GPU (full W, same N) time on rank 0."))
    dist.barrier()
    dist.destroy_process_group()


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
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
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

    globals()["LOGIT_STD"] = args.logit_std
    if args.vocab_parallel:
        return vocab_parallel(args)

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dev = Dev(device)
    log(f"device: {dev.name()}  torch {torch.__version__}  backend(fused)={args.backend}")
    if args.sweep:
        table = sweep(args, dev)
        emit(table, dev, args, "Fused CE sweep (fwd+bwd)", (f"- impls: {args.sweep_impls}; dtype {args.dtype}",))
        return 0
    rows = bench_shapes(args, dev)
    table = markdown_table(rows)
    emit(table, dev, args, "Kernel benchmark: LM head + CE fwd+bwd",
         (f"- dtype {args.dtype}, labels uniform with 10% ignore_index, fused backend={args.backend}, "
          f"warmup {args.warmup} calls and >= {args.warmup_s:g} s, reps {args.reps}",
          DEFINITIONS[0].format(C=args.floor_chunk, S=(
              f"W ~ N(0, {W_STD}^2) (logit std {W_STD}*sqrt(D))" if args.logit_std is None
              else f"W ~ N(0, s^2/D), logit std s={args.logit_std}"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
