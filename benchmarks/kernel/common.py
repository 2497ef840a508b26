"""What the kernel benchmark's modes share (kernel/bench.py, kernel/sweep.py,
kernel/vocab_parallel.py): inputs (random and LM-like) and the fp64 reference, the device, one
timed implementation (``run_one`` -> ``Row``), one accuracy-only call (``accuracy_of``), the
table columns and the block header. The definitions of the
measured numbers are in kernel/bench.py's docstring.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

from benchmarks.bench_common import cell, cpu_name, emit, header
from benchmarks.reference import Reference, reference_loss, rel_err

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
        return torch.cuda.get_device_name(self.device) if self.cuda else cpu_name()

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
# inputs and the fp64 reference
# --------------------------------------------------------------------------------------
INPUT_KINDS = ("random", "lm")
# LM-like inputs (make_lm_inputs): per row the label's logit is log(V) + m, m ~ N(LM_MARGIN,
# LM_MARGIN_SD^2), LM_ALTS other tokens sit 0.5..5 below it, the rest is N(0, 1) noise. Measured
# (fp64, bf16 inputs): mean target prob 0.43-0.50, entropy 2.4-3.3 nats from (256, 256, 2000)
# to (256, 4096, 128256); ~0.3 at D=64 where W's rows are far from orthogonal.
LM_MARGIN, LM_MARGIN_SD, LM_ALTS, LM_ALT_GAP = 2.5, 2.0, 4, (0.5, 5.0)
LM_TARGET_PROB = (0.3, 0.6)  # the aimed range of the mean target probability


@dataclass
class Inputs:
    h: torch.Tensor
    W: torch.Tensor
    y: torch.Tensor
    kind: str = "random"


def _weights_labels(N, D, V, device, seed, ignore_frac, logit_std):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    # W ~ N(0, 0.02^2) (logit std 0.02*sqrt(D) on random h: 1.28 at D=4096, 0.96 at D=2304), or
    # W ~ N(0, s^2/D) so that the logits have std s when --logit-std s is given.
    # CCE's gradient filtering makes its time depend strongly on this (H200, 8B head: 47 ms at
    # logit std 0.5, 143 ms at 1.5); the other impls do not care.
    w_scale = W_STD if logit_std is None else logit_std / math.sqrt(D)
    h = torch.randn(N, D, generator=g, device=device, dtype=torch.float32)
    W = torch.randn(V, D, generator=g, device=device, dtype=torch.float32) * w_scale
    y = torch.randint(0, V, (N,), generator=g, device=device, dtype=torch.int64)
    mask = torch.rand(N, generator=g, device=device) < ignore_frac
    return g, h, W, y, mask


def _finish(h, W, y, mask, dtype, kind) -> Inputs:
    h = h.to(dtype).requires_grad_(True)
    W = W.to(dtype).requires_grad_(True)
    return Inputs(h, W, y.masked_fill(mask, IGNORE), kind)


def make_inputs(N, D, V, dtype, device, seed=0, ignore_frac=0.1, logit_std=None, kind="random") -> Inputs:
    """kind "random": h ~ N(0,1), W ~ N(0, 0.02^2), labels uniform (10% ignore_index): a flat
    softmax (target prob ~1/V). kind "lm": make_lm_inputs (a peaked softmax)."""
    if kind == "lm":
        return make_lm_inputs(N, D, V, dtype, device, seed, ignore_frac, logit_std)
    if kind != "random":
        raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {kind!r}")
    _, h, W, y, mask = _weights_labels(N, D, V, device, seed, ignore_frac, logit_std)
    return _finish(h, W, y, mask, dtype, kind)


@torch.no_grad()
def make_lm_inputs(N, D, V, dtype, device, seed=0, ignore_frac=0.1, logit_std=None, row_chunk=8192) -> Inputs:
    """A softmax peaked as in a trained LM. The same W and labels as make_inputs; h is built so
    that for each row the label's logit is T = log(V) + m (m ~ N(2.5, 2^2): some rows sure,
    some not), LM_ALTS random plausible alternatives sit 0.5..5 below T, and the rest is noise
    of std 1 in logit units:  h = noise + sum_k c_k * W[t_k] / |W[t_k]|^2  (t_0 the label,
    c_0 = T). Ignored rows are built the same (around the label drawn before masking)."""
    g, h, W, y, mask = _weights_labels(N, D, V, device, seed, ignore_frac, logit_std)
    n2 = (W * W).sum(1)
    h.mul_(1.0 / n2.mean().sqrt())  # noise of std ~1 in logit units
    lo, hi = LM_ALT_GAP
    T = math.log(V) + LM_MARGIN + LM_MARGIN_SD * torch.randn(N, generator=g, device=device)
    alts = torch.randint(0, V, (LM_ALTS, N), generator=g, device=device, dtype=torch.int64)
    gaps = lo + (hi - lo) * torch.rand(LM_ALTS, N, generator=g, device=device)
    for s in range(0, N, row_chunk):  # bounded temporaries: [row_chunk, D] fp32
        e = min(N, s + row_chunk)
        for k in range(LM_ALTS + 1):
            t = y[s:e] if k == 0 else alts[k - 1, s:e]
            c = T[s:e] if k == 0 else T[s:e] - gaps[k - 1, s:e]
            h[s:e].addcmul_((c / n2[t])[:, None], W[t])
    return _finish(h, W, y, mask, dtype, "lm")


@torch.no_grad()
def inputs_or_none(shape, dtype, dev, args, kind="random") -> Inputs | None:
    """The benchmark inputs, or None when they alone do not fit in memory."""
    try:
        return make_inputs(*shape, dtype, dev.device, seed=args.seed, logit_std=args.logit_std, kind=kind)
    except Exception as e:
        if not is_oom(e):
            raise
        return None


def fp64_reference(inp: Inputs, chunk=1024, reduction="sum") -> Reference:
    """Loss, dh and dW of cross_entropy(h @ W.T, y) of the inputs as stored, in float64
    (reference.reference_loss, in chunks of `chunk` rows). dh, dW stay fp64: errors are
    measured against them."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reference reduction must be sum or mean, got {reduction!r}")
    return reference_loss(inp.h, inp.W, inp.y, ignore_index=IGNORE, reduction=reduction, chunk=chunk)


def reference_or_none(inp: Inputs, dev, args, what="") -> Reference | None:
    """fp64_reference, or None (no accuracy) when N > --acc-max-n, --no-accuracy, or it fails."""
    N = inp.h.shape[0]
    if args.no_accuracy or N > args.acc_max_n:
        return None
    try:
        ref = fp64_reference(inp, chunk=args.ref_chunk, reduction=args.reduction)
        dev.sync()
        log(f"  fp64 reference{what} ({inp.kind} inputs): {ref.seconds:.1f}s  loss={ref.loss.item():.6e}  "
            f"{ref.describe()}")
        return ref
    except Exception as e:
        log(f"  fp64 reference{what} failed ({'OOM' if is_oom(e) else repr(e)[:100]}); no accuracy")
        dev.cleanup()
        return None


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
            row.loss_err, row.dh_err, row.dW_err = errors(out, h, W, ref)
            row.extra.setdefault("acc", {})[inp.kind] = (row.loss_err, row.dh_err, row.dW_err)
            if not math.isfinite(row.loss_err):
                row.status = "NaN loss"
        del out
    except Exception as e:
        row.status = failure_status(e)
    finally:
        release(fn, inp, dev)
    return row


def failure_status(e: Exception) -> str:
    """The table cell of a run that raised: NotAvailable's message, "OOM", or the error (whose
    traceback is printed)."""
    if isinstance(e, NotAvailable):
        return str(e)
    if is_oom(e):
        return "OOM"
    traceback.print_exc()
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def release(fn, inp: Inputs, dev: Dev) -> None:
    """After a run: the grads and the impl's persistent buffers dropped, the device cleaned."""
    inp.h.grad = None
    inp.W.grad = None
    if hasattr(fn, "release"):
        fn.release()
    dev.cleanup()


def errors(out, h, W, ref: Reference):
    """(loss, dh, dW) relative errors of one call's loss and grads against the reference."""
    lv = float(out.detach().double().item())
    lr = float(ref.loss.item())
    loss_err = abs(lv - lr) / max(abs(lr), 1e-30) if math.isfinite(lv) else float("nan")
    return loss_err, rel_err(h.grad, ref.dh), rel_err(W.grad, ref.dW)


def accuracy_of(fn, inp: Inputs, dev: Dev, ref: Reference):
    """One untimed fwd+bwd of fn on inp: ((loss, dh, dW) errors, "ok") or (None, a status)."""
    h, W = inp.h, inp.W
    try:
        h.grad = None
        W.grad = None
        out = fn(h, W, inp.y)
        out.backward()
        return errors(out, h, W, ref), "ok"
    except Exception as e:
        return None, failure_status(e)
    finally:
        release(fn, inp, dev)


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
