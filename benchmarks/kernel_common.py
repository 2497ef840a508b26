"""What the kernel benchmark's modes share (bench_kernel.py, kernel_sweep.py,
kernel_vocab_parallel.py): inputs and the fp32 reference, the device, one timed implementation
(``run_one`` -> ``Row``), the table columns and the block header. The definitions of the
measured numbers are in bench_kernel.py's docstring.
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from bench_common import ROOT, cell, emit, header

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # fused_loss without an install

IGNORE = -100
SHAPE_NAMES = {
    (8192, 4096, 128256): "Llama-3-8B head",
    (8192, 2304, 256000): "Gemma-2-2B head",
    (16384, 2048, 151936): "Qwen3-1.7B head",
    (32768, 4096, 128256): "Llama-3-8B head",
}
W_STD = 0.02  # W ~ N(0, W_STD^2), the usual LM-head init, unless a logit std is asked for


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

    def emit(self, args, title: str, table: str, notes=()) -> None:
        """Print the results block (table last); append it to --results unless --no-append."""
        block = header(title, self.name(), notes, packages=("torch", "triton", "liger_kernel", "cut_cross_entropy"))
        emit(block + table + "\n", args.results, not args.no_append)


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





def make_inputs(N, D, V, dtype, device, seed=0, ignore_frac=0.1, logit_std=None) -> Inputs:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    # h ~ N(0,1); W ~ N(0, 0.02^2) (logit std 0.02*sqrt(D): 1.28 at D=4096, 0.96 at D=2304), or
    # W ~ N(0, s^2/D) so that the logits have std s when --logit-std s is given.
    # CCE's gradient filtering makes its time depend strongly on this (H200, 8B head: 47 ms at
    # logit std 0.5, 143 ms at 1.5); the other impls do not care.
    w_scale = W_STD if logit_std is None else logit_std / math.sqrt(D)
    h = torch.randn(N, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    W = (torch.randn(V, D, generator=g, device=device, dtype=torch.float32) * w_scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g, device=device, dtype=torch.int64)
    mask = torch.rand(N, generator=g, device=device) < ignore_frac
    y = y.masked_fill(mask, IGNORE)
    h.requires_grad_(True)
    W.requires_grad_(True)
    return Inputs(h, W, y)


@torch.no_grad()
def inputs_or_none(shape, dtype, dev, args) -> Inputs | None:
    """The benchmark inputs, or None when they alone do not fit in memory."""
    try:
        return make_inputs(*shape, dtype, dev.device, seed=args.seed, logit_std=args.logit_std)
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


class NotAvailable(Exception):
    """An implementation that cannot run here: its message is the table cell ("n/a (needs CUDA)")."""


# --------------------------------------------------------------------------------------
# one implementation timed
# --------------------------------------------------------------------------------------
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


# the columns both tables show, formatted alike
TFLOPS_COL = ("TFLOP/s", lambda r: cell(r.tflops, ".0f"))
PEAK_COL = ("peak GiB", lambda r: cell(r.peak_gib, ".2f"))
TAIL_COLS = [("first call s", lambda r: cell(r.first_s, ".1f")), ("status", lambda r: r.status)]


def extra_col(key, spec):
    return lambda r: cell(r.extra.get(key), spec)


def print_row(r: Row):
    log(
        f"  {r.impl:>8s}: "
        + (f"{r.ms:9.2f} ms  {r.tflops:6.0f} TFLOP/s" if r.ms is not None else f"{r.status:>26s}")
        + (f"  peak {r.peak_gib:6.2f} GiB" if r.peak_gib is not None else "")
        + (f"  loss {r.loss_err:.1e} dh {r.dh_err:.1e} dW {r.dW_err:.1e}" if r.dh_err is not None else "")
        + (f"  first {r.first_s:.1f}s" if r.first_s is not None else "")
        + (f"  [{r.status}]" if r.status != "ok" and r.ms is not None else "")
    )
