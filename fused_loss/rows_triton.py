"""The per-row passes over one logits chunk as Triton kernels, on the vendor GEMM's logits: the
Triton backend's "vendor" path (plan.logits_path: fp32 inputs, and 16-bit inputs where the
GEMM epilogue path cannot run), and the backward's scale pass on every Triton path.

Same contract as rows_torch, but the chunk is the logits buffer itself: `vendor_chunk` is the
vendor GEMM in the inputs' dtype. One program per row walks the vocabulary slice in blocks: the
statistics pass keeps an online max / sum-exp in fp32 (one exp per element) over the logits
as the buffer holds them (for 16-bit inputs rounded to 16 bits, as eager's: the fallback's
accuracy, see epilogue_triton for the path that avoids it); the gradient pass rewrites the
row in place. With token_stats the same online pass also keeps the
entropy's numerator and the argmax (two more columns; off, the kernels compile as without).
`row_stats_and_grad_` does both in one launch when no collective has to run between them (a
single rank): the row is re-read while it is still in L2.
`scale_into` is the backward's last pass (the saved gradients times the upstream scalar).

Offsets are int64 (`row * stride` passes 2^31 at 32k tokens x 128k vocab). Labels are only
compared, never used as an address outside [0, V_local): out-of-range labels cannot fault.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .options import LossOptions
from .rows_torch import vendor_logits

_BLOCK_V = 4096
_NUM_WARPS = 8
_SCALE_BLOCK = 4096
# Compiled kernels call libdevice; the interpreter (TRITON_INTERPRET=1, chosen when triton's
# jit decorates, i.e. at this import) has none and runs the portable formulas instead.
_LIBDEVICE = tl.constexpr(not triton.knobs.runtime.interpret)


@triton.jit
def _tanh(u):
    """tanh in fp32 within a few ulps of torch.tanh at every |u|.

    On a GPU, libdevice's tanhf (what torch.tanh runs). The interpreter has no libdevice, so
    there Cephes' tanhf: an odd minimax polynomial below |u| = 0.625 and (1 - e)/(1 + e) with
    e = exp(-2|u|) above (no cancellation there: e <= 0.29; no overflow: e <= 1). The older
    1 - 2/(exp(2u) + 1) lost all relative precision at small u (~7e5 ulps at u = 1e-4)."""
    if _LIBDEVICE:
        return libdevice.tanh(u)
    else:
        a = tl.abs(u)
        e = tl.exp(-2.0 * a)
        big = (1.0 - e) / (1.0 + e)
        big = tl.where(u < 0, -big, big)
        s = u * u
        small = ((((-5.70498872745e-3 * s + 2.06390887954e-2) * s - 5.37397155531e-2) * s
                  + 1.33314422036e-1) * s - 3.33332819422e-1) * s * u + u
        return tl.where(a < 0.625, small, big)


@triton.jit
def _sech2(u, t):
    """d tanh(u)/du = 1 - tanh(u)^2 given t = tanh(u), accurate at every |u|: 1 - t*t cancels
    as |t| nears 1 (relative error eps / sech^2(u), ~1e-3 of the element at |u| = 6), so from
    |u| = 0.625 on it is 4e / (1 + e)^2 with e = exp(-2|u|) instead."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    r = 1.0 / (1.0 + e)
    return tl.where(a < 0.625, 1.0 - t * t, 4.0 * e * r * r)


@triton.jit
def _cap(x, cap, HAS_CAP: tl.constexpr):
    if HAS_CAP:
        return cap * _tanh(x / cap)
    else:
        return x


@triton.jit
def _stats(z_row, V_local, local_target, on_slice, cap,
           HAS_CAP: tl.constexpr, NEED_SUM: tl.constexpr, TOKEN_STATS: tl.constexpr,
           BLOCK_V: tl.constexpr):
    """Online row max / sum-exp (and logit sum); with TOKEN_STATS also T = sum e^(y-m) (y-m),
    rescaled with the max as sum-exp is, and the argmax (first of ties: a later block takes
    over only with a strictly greater max)."""
    row_max = -float("inf")
    sum_exp = 0.0
    logit_sum = 0.0
    spread = 0.0
    best = 0
    for start in range(0, V_local, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V_local
        y = _cap(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), cap, HAS_CAP)
        y = tl.where(mask, y, -float("inf"))
        if TOKEN_STATS:
            block_max = tl.max(y, 0)
            new_max = tl.maximum(row_max, block_max)
            alpha = tl.exp(row_max - new_max)
            d = y - new_max
            e = tl.exp(d)
            # T_old is relative to the old max: T + (m_old - m_new) S, then rescaled; the
            # first block (S = 0, m_old = -inf) and masked columns (e = 0) add nothing
            moved = tl.where(sum_exp > 0, row_max - new_max, 0.0) * sum_exp
            spread = alpha * (spread + moved) + tl.sum(tl.where(e > 0, d, 0.0) * e, 0)
            sum_exp = sum_exp * alpha + tl.sum(e, 0)
            best = tl.where(block_max > row_max, start + tl.argmax(y, 0, tie_break_left=True),
                            best)
        else:
            new_max = tl.maximum(row_max, tl.max(y, 0))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(y - new_max), 0)
        row_max = new_max
        if NEED_SUM:
            logit_sum += tl.sum(tl.where(mask, y, 0.0), 0)
    target = tl.load(z_row + local_target, mask=on_slice, other=0.0).to(tl.float32)
    target = tl.where(on_slice, _cap(target, cap, HAS_CAP), 0.0)
    return row_max, sum_exp, target, logit_sum, spread, best


@triton.jit
def _grad(z_row, V_local, lse, scale, local_target, on_slice, valid, smoothing, z_loss,
          inv_vocab, cap, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    p_coef = 1.0 + 2.0 * z_loss * lse
    off = smoothing * inv_vocab
    hit = tl.where(on_slice, 1.0 - smoothing, 0.0)
    for start in range(0, V_local, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V_local
        x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = _cap(x, cap, HAS_CAP)
        g = tl.exp(y - lse) * p_coef - off - tl.where(cols == local_target, hit, 0.0)
        if HAS_CAP:
            g = g * _sech2(x / cap, y / cap)
        g = tl.where(valid, g * scale, 0.0)
        tl.store(z_row + cols, g.to(z_row.dtype.element_ty), mask=mask)


@triton.jit
def _row_target(labels_ptr, row, vocab_start, V_local, ignore_index):
    label = tl.load(labels_ptr + row)
    local = label - vocab_start
    on_slice = (local >= 0) & (local < V_local)
    return tl.where(on_slice, local, 0), on_slice, label != ignore_index


@triton.jit
def _store_stats(stats_row, row_max, sum_exp, target, logit_sum, spread, best, vocab_start,
                 TOKEN_STATS: tl.constexpr):
    tl.store(stats_row + 0, row_max)
    tl.store(stats_row + 1, sum_exp)
    tl.store(stats_row + 2, target)
    tl.store(stats_row + 3, logit_sum)
    if TOKEN_STATS:  # the global argmax as int32 bits in the fp32 row (rows_torch.row_stats)
        tl.store(stats_row + 4, spread)
        tl.store(stats_row + 5, (best + vocab_start).to(tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _stats_kernel(z_ptr, stride_z, labels_ptr, stats_ptr, V_local, vocab_start, ignore_index,
                  cap, HAS_CAP: tl.constexpr, NEED_SUM: tl.constexpr, TOKEN_STATS: tl.constexpr,
                  N_STATS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    local, on_slice, _ = _row_target(labels_ptr, row, vocab_start, V_local, ignore_index)
    m, s, t, a, sp, b = _stats(z_row, V_local, local, on_slice, cap, HAS_CAP, NEED_SUM,
                               TOKEN_STATS, BLOCK_V)
    _store_stats(stats_ptr + row * N_STATS, m, s, t, a, sp, b, vocab_start, TOKEN_STATS)


@triton.jit
def _grad_kernel(z_ptr, stride_z, labels_ptr, lse_ptr, scale_ptr, stride_scale, V_local,
                 vocab_start, ignore_index, smoothing, z_loss, inv_vocab, cap,
                 HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    local, on_slice, valid = _row_target(labels_ptr, row, vocab_start, V_local, ignore_index)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row * stride_scale)
    _grad(z_ptr + row * stride_z, V_local, lse, scale, local, on_slice, valid, smoothing, z_loss,
          inv_vocab, cap, HAS_CAP, BLOCK_V)


@triton.jit
def _stats_and_grad_kernel(z_ptr, stride_z, labels_ptr, stats_ptr, scale_ptr, V_local,
                           vocab_start, ignore_index, smoothing, z_loss, inv_vocab, cap,
                           HAS_CAP: tl.constexpr, NEED_SUM: tl.constexpr,
                           TOKEN_STATS: tl.constexpr, N_STATS: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    local, on_slice, valid = _row_target(labels_ptr, row, vocab_start, V_local, ignore_index)
    m, s, t, a, sp, b = _stats(z_row, V_local, local, on_slice, cap, HAS_CAP, NEED_SUM,
                               TOKEN_STATS, BLOCK_V)
    _store_stats(stats_ptr + row * N_STATS, m, s, t, a, sp, b, vocab_start, TOKEN_STATS)
    _grad(z_row, V_local, m + tl.log(s), tl.load(scale_ptr), local, on_slice, valid, smoothing,
          z_loss, inv_vocab, cap, HAS_CAP, BLOCK_V)


@triton.jit
def _scale_kernel(src_ptr, out_ptr, scale_ptr, n, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr)
    # In place, a factor of exactly 1 (the upstream gradient the forward was told of) leaves
    # every element as it is: skip the read and the write (dW: 2 x V*D*2 bytes, ~0.5 ms at
    # the 8B head), decided on the device, with no host sync.
    if (scale != 1.0) | (not IN_PLACE):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _common(z: torch.Tensor, opts: LossOptions) -> dict:
    return dict(V_local=z.shape[1], vocab_start=opts.vocab_start, ignore_index=opts.ignore_index,
                cap=1.0 if opts.logit_softcap is None else opts.logit_softcap,
                HAS_CAP=opts.logit_softcap is not None,
                BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(z.shape[1])),
                num_warps=_NUM_WARPS)


def _grad_consts(opts: LossOptions) -> dict:
    return dict(smoothing=float(opts.label_smoothing), z_loss=float(opts.z_loss),
                inv_vocab=1.0 / opts.vocab_size)


def _stats_consts(opts: LossOptions, token_stats: bool) -> dict:
    return dict(NEED_SUM=bool(opts.label_smoothing), TOKEN_STATS=token_stats,
                N_STATS=6 if token_stats else 4)


def vendor_chunk(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 labels: torch.Tensor, out: torch.Tensor, opts: LossOptions,
                 token_stats: bool = False, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk's logits by the vendor GEMM, into `out` (the chunk the row passes take; no
    side buffers, so no use for `scratch`)."""
    vendor_logits(h_c, weight, bias, out)
    return out


def row_stats(z: torch.Tensor, labels: torch.Tensor, opts: LossOptions,
              token_stats: bool = False) -> torch.Tensor:
    stats = torch.empty(z.shape[0], 6 if token_stats else 4, dtype=torch.float32,
                        device=z.device)
    _stats_kernel[(z.shape[0],)](z, z.stride(0), labels, stats,
                                 **_stats_consts(opts, token_stats), **_common(z, opts))
    return stats


def row_grad_(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
              opts: LossOptions) -> None:
    _grad_kernel[(z.shape[0],)](z, z.stride(0), labels, lse, row_scale, row_scale.stride(0),
                                **_grad_consts(opts), **_common(z, opts))


def row_stats_and_grad_(z: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                        opts: LossOptions, token_stats: bool = False) -> torch.Tensor:
    """Single rank only: statistics, then z := scale * dloss/dz (scale: an fp32 device
    scalar), in one launch."""
    stats = torch.empty(z.shape[0], 6 if token_stats else 4, dtype=torch.float32,
                        device=z.device)
    _stats_and_grad_kernel[(z.shape[0],)](z, z.stride(0), labels, stats, scale,
                                          **_stats_consts(opts, token_stats),
                                          **_grad_consts(opts), **_common(z, opts))
    return stats


def scale_into(src: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out := src * scale (a device scalar), in fp32, rounded once to out's dtype; out may be src.

    Not torch.mul: with a 0-dim CUDA tensor operand it takes a non-vectorized kernel (2.1 ms
    for the 8B head's bf16 dW on an H200, against 0.44 ms at bandwidth: benchmarks/NOTES.md).
    Bumps out's autograd version, as an in-place torch op would.
    """
    if not (src.is_contiguous() and out.is_contiguous() and src.numel() == out.numel()):
        raise ValueError(f"scale_into needs contiguous tensors of one size, got {tuple(src.shape)} "
                         f"and {tuple(out.shape)}")
    n = src.numel()
    if n:
        _scale_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](src, out, scale.float(), n,
                                                       IN_PLACE=src.data_ptr() == out.data_ptr(),
                                                       BLOCK=_SCALE_BLOCK, num_warps=_NUM_WARPS)
    torch.autograd.graph.increment_version(out)
