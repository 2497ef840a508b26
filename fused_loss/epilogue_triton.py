"""The logits GEMM whose epilogue takes the row statistics from the fp32 accumulator, and the
row passes that read what it leaves: the Triton backend's path for 16-bit inputs
(`plan.logits_path`).

Eager `F.cross_entropy(h @ W.T)` rounds the logits to 16 bits before the softmax: every
probability then carries |z| * 2^-8 of relative error (bf16), the loss the same in absolute
terms. Here nothing is taken from rounded logits. Per tile of BM tokens x BN vocabulary rows
the epilogue holds z = h W^T (+ b) in fp32 (capped: y = cap tanh(z / cap)) and writes:

  E = fp16(2^15 exp(y - m_t) [* sech^2(z / cap)])   into the chunk buffer (2 bytes per logit,
      as the logits took), m_t the tile row's max: each exponential at fp16's relative
      precision (2^-11), normal down to 2^-29 of the tile's largest (the 2^15)
  partials [C, n_tiles, P] fp32, from the accumulator: m_t, sum exp(y - m_t); the sum of y
      with label smoothing; sum exp(y - m_t)(y - m_t) and the argmax with token_stats
  z_t [C] fp32: the target's logit, written by the tile that holds the label

Then per row, `row_stats` folds the tiles' partials into the statistics of rows_torch's
format (max, sum-exp, target, logit sum[, spread, argmax]): the vocabulary-parallel combine and
loss_from_stats take them as they are. `row_grad_` rewrites E in place into the gradient rows
in the inputs' dtype, g = E 2^-15 exp(m_t - lse)(1 + 2 z_loss lse) - eps / V, the target's entry
computed from z_t in fp32: one rounding per element, where eager rounds twice (the logit,
then the gradient). A single rank does both in one launch (`row_stats_and_grad_`).
With a softcap the factor sech^2(z / cap) is folded into E, so label smoothing's constant
term (which needs it alone) is not served with a softcap: plan.logits_path keeps that
combination on the cuBLAS path.

Offsets are int64 (`row * V_local` passes 2^31). The GEMM loads through TMA descriptors
(`TensorDescriptor`: zero padding past the edges), so D * element size must be a multiple of
16 bytes (plan.logits_path checks).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .options import LossOptions
from .rows_triton import _cap, _row_target, _sech2, _store_stats

# One configuration, the fastest of benchmarks/kernel/gemm.py's on an H200 (benchmarks/NOTES.md): 96 KB
# of shared memory and 4 warps, so two programs share a multiprocessor and one's epilogue runs
# beside the other's main loop. The row passes walk the partials tile by tile, so BN is part
# of the format, not a tuning knob behind autotune.
GEMM_CONFIG = dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=4, num_stages=3)
_ROW_BLOCK = 4096  # elements per step of the row passes (whole tiles of BN)
_ROW_WARPS = 8
E_LOG2 = tl.constexpr(15)  # E's largest element 2^15: exact in fp16 (max 65504)
_E_UNSCALE = tl.constexpr(2.0 ** -15)  # 2^-E_LOG2, exact
_LOG2E = tl.constexpr(1.4426950408889634)
# the partials' columns (constexpr: read inside the kernels)
_COL_MAX, _COL_SUM, _COL_LOGIT_SUM, _COL_SPREAD, _COL_ARGMAX = (tl.constexpr(i) for i in range(5))
# The interpreter's 16-bit bf16 dot is broken (triton 3.6): there the tiles go to fp32 first
# (products of 16-bit numbers are exact in fp32, as in the tensor cores).
_INTERPRET = tl.constexpr(bool(triton.knobs.runtime.interpret))


class Chunk(NamedTuple):
    """What the GEMM leaves for one chunk: E (then the gradient rows) in `out`, the partials,
    the target logits, and the tile width."""

    out: torch.Tensor  # [C, V_local] in the inputs' dtype (holds fp16 E until row_grad_)
    partials: torch.Tensor  # [C, n_tiles, P] fp32
    target: torch.Tensor  # [C] fp32, the raw (uncapped) target logit where on this slice
    bn: int


def n_partials(opts: LossOptions, token_stats: bool) -> int:
    if token_stats:
        return 5
    return 3 if opts.label_smoothing else 2


def side_buffers(m: int, n_tiles: int, p: int, device: torch.device,
                 scratch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's partials [m, n_tiles, p] and target logits [m], fp32: carved from `scratch`
    (bytes of an output not yet written: chunked.run) where they fit, else new. 4 B per
    partial, 8-20 B per tile row: 1/32 to 1/13 of E's bytes, the memory above the logits
    they would otherwise add."""
    n_part = m * n_tiles * p
    if scratch is not None and scratch.numel() >= 4 * (n_part + m):
        flat = scratch[: 4 * (n_part + m)].view(torch.float32)
        return flat[:n_part].view(m, n_tiles, p), flat[n_part:]
    return (torch.empty(m, n_tiles, p, dtype=torch.float32, device=device),
            torch.empty(m, dtype=torch.float32, device=device))


@triton.jit
def _logits_kernel(h_desc, w_desc, bias_ptr, labels_ptr, e_ptr, stride_e, part_ptr, target_ptr,
                   M, V, K, vocab_start, cap,
                   HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, NEED_SUM: tl.constexpr,
                   TOKEN_STATS: tl.constexpr, P: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(V, BN)
    in_group = GROUP_M * n_n  # GROUP_M token tiles walk the vocabulary together (L2 reuse)
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    m0 = pid_m * BM
    n0 = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = h_desc.load([m0, k])
        b = w_desc.load([n0, k])
        if _INTERPRET:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc)

    rows = m0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    label = tl.load(labels_ptr + rows, mask=rows < M, other=-1)
    e = tile_epilogue(acc, rows, label, offs_n, pid_n, n_n, bias_ptr, part_ptr, target_ptr,
                      M, V, vocab_start, cap, HAS_BIAS, HAS_CAP, NEED_SUM, TOKEN_STATS, P, BN)
    store_tile(e_ptr, stride_e, rows, offs_n, pid_n, e, M, V, BN)


@triton.jit
def tile_epilogue(acc, rows, label, offs_n, pid_n, n_n, bias_ptr, part_ptr, target_ptr, M, V,
                  vocab_start, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                  NEED_SUM: tl.constexpr, TOKEN_STATS: tl.constexpr, P: tl.constexpr,
                  BN: tl.constexpr):
    """One tile's epilogue from its fp32 accumulator [len(rows), BN]: stores the partials and
    the target logits (the module docstring) and returns the tile of E in fp16, for the
    caller's store (`store_tile`, or epilogue_gluon's TMA store). Shared by this module's GEMM
    and epilogue_gluon's: rows, their labels (-1 past M) and offs_n (0..BN-1) come in the
    caller's layouts (Gluon's aranges carry one); the caller loads the labels, so that it can
    load them ahead."""
    n0 = pid_n * BN
    cols = n0 + offs_n
    row_ok = rows < M
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    # the target logit first: without a softcap z is dead after y (registers for the rest)
    local = label - vocab_start - n0
    here = row_ok & (local >= 0) & (local < BN) & (n0 + local < V)
    if tl.max(here.to(tl.int32), 0) > 0:  # most tiles hold no row's label: skip the search
        z_t = tl.sum(tl.where(offs_n[None, :] == local[:, None], z, 0.0), 1)
        tl.store(target_ptr + rows, z_t, mask=here)
    y = _cap(z, cap, HAS_CAP)
    if n0 + BN > V:  # the last tile: the columns past the vocabulary take no part
        y = tl.where((cols < V)[None, :], y, -float("inf"))
    m_t = tl.max(y, 1)
    # e = 2^15 exp(y - m_t) by one FMA and one ex2 per element (0 past the vocabulary's end);
    # the partials take it back by the exact power of two
    e = tl.exp2(y * _LOG2E - (m_t * _LOG2E - E_LOG2)[:, None])
    part = part_ptr + (rows.to(tl.int64) * n_n + pid_n) * P
    tl.store(part + _COL_MAX, m_t, mask=row_ok)
    tl.store(part + _COL_SUM, tl.sum(e, 1) * _E_UNSCALE, mask=row_ok)
    if NEED_SUM:
        tl.store(part + _COL_LOGIT_SUM, tl.sum(tl.where(cols[None, :] < V, y, 0.0), 1),
                 mask=row_ok)
    if TOKEN_STATS:
        d = y - m_t[:, None]
        tl.store(part + _COL_SPREAD, tl.sum(tl.where(e > 0, d, 0.0) * e, 1) * _E_UNSCALE,
                 mask=row_ok)
        # the first column at the row's max (tl.argmax would need a layout-free arange)
        first = tl.min(tl.where(y == m_t[:, None], offs_n[None, :], BN), 1)
        best = n0 + first + vocab_start
        tl.store(part + _COL_ARGMAX, best.to(tl.int32).to(tl.float32, bitcast=True), mask=row_ok)
    if HAS_CAP:
        e = e * _sech2(z / cap, y / cap)
    return e.to(tl.float16)


@triton.jit
def store_tile(e_ptr, stride_e, rows, offs_n, pid_n, e, M, V, BN: tl.constexpr):
    """E's tile into the chunk buffer by plain stores (int64 offsets)."""
    cols = pid_n * BN + offs_n
    tl.store(e_ptr + rows.to(tl.int64)[:, None] * stride_e + cols[None, :], e,
             mask=(rows < M)[:, None] & (cols < V)[None, :])


@triton.jit
def _merge(part_row, n_tiles, P: tl.constexpr, NEED_SUM: tl.constexpr,
           TOKEN_STATS: tl.constexpr, TB: tl.constexpr):
    """The row's statistics from its tiles' partials, merged as vocab_parallel.combine_stats
    merges ranks: max, sum-exp rescaled to it, logit sum, spread, argmax (first of ties: a later
    block takes over only with a strictly greater max, and within a block the smallest index
    among the tiles at its max)."""
    row_max = -float("inf")
    sum_exp = 0.0
    logit_sum = 0.0
    spread = 0.0
    best = 0
    for start in range(0, n_tiles, TB):
        t = start + tl.arange(0, TB)
        ok = t < n_tiles
        m_t = tl.load(part_row + t * P + _COL_MAX, mask=ok, other=-float("inf"))
        s_t = tl.load(part_row + t * P + _COL_SUM, mask=ok, other=0.0)
        block_max = tl.max(m_t, 0)
        new_max = tl.maximum(row_max, block_max)
        w = tl.exp(m_t - new_max)  # 0 for the masked tiles
        alpha = tl.exp(row_max - new_max)
        if TOKEN_STATS:
            sp_t = tl.load(part_row + t * P + _COL_SPREAD, mask=ok, other=0.0)
            # each T is relative to its own max: T + (m - M) S, then rescaled to M
            moved = tl.where(s_t > 0, (m_t - new_max) * s_t, 0.0)
            old = tl.where(sum_exp > 0, (row_max - new_max) * sum_exp, 0.0)
            spread = alpha * (spread + old) + tl.sum(w * (sp_t + moved), 0)
            index = tl.load(part_row + t * P + _COL_ARGMAX, mask=ok, other=0.0)
            index = index.to(tl.int32, bitcast=True)
            first = tl.min(tl.where(ok & (m_t == block_max), index, 2147483647), 0)
            best = tl.where(block_max > row_max, first, best)
        sum_exp = sum_exp * alpha + tl.sum(w * s_t, 0)
        if NEED_SUM:
            logit_sum += tl.sum(tl.load(part_row + t * P + _COL_LOGIT_SUM, mask=ok, other=0.0), 0)
        row_max = new_max
    return row_max, sum_exp, logit_sum, spread, best


@triton.jit
def _grad(e_row, out_row, part_row, n_tiles, V_local, lse, scale, z_t, local, on_slice, valid,
          smoothing, z_loss, inv_vocab, cap, P: tl.constexpr, HAS_CAP: tl.constexpr,
          BN: tl.constexpr, TPB: tl.constexpr):
    """out := scale * dloss/dz from E, a block of TPB whole tiles at a time (one factor per
    tile); the target's entry from z_t in fp32. out and E may be one buffer: each element is
    read before it is written, by this program alone."""
    p_coef = 1.0 + 2.0 * z_loss * lse
    off = smoothing * inv_vocab
    y_t = _cap(z_t, cap, HAS_CAP)
    g_t = tl.exp(y_t - lse) * p_coef - off - (1.0 - smoothing)
    if HAS_CAP:
        g_t = g_t * _sech2(z_t / cap, y_t / cap)
    g_t = tl.where(valid, g_t * scale, 0.0)
    factor_coef = p_coef * scale * _E_UNSCALE  # E's 2^15 out again
    for t0 in range(0, n_tiles, TPB):
        t = t0 + tl.arange(0, TPB)
        m_t = tl.load(part_row + t * P + _COL_MAX, mask=t < n_tiles, other=0.0)
        factor = tl.exp(m_t - lse) * factor_coef
        cols = t[:, None] * BN + tl.arange(0, BN)[None, :]
        mask = cols < V_local
        g = tl.load(e_row + cols, mask=mask, other=0.0).to(tl.float32) * factor[:, None]
        g = g - off * scale
        g = tl.where(on_slice & (cols == local), g_t, g)
        g = tl.where(valid, g, 0.0)
        tl.store(out_row + cols, g.to(out_row.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats_of(part_row, target_ptr, row, n_tiles, local, on_slice, cap,
                  P: tl.constexpr, HAS_CAP: tl.constexpr, NEED_SUM: tl.constexpr,
                  TOKEN_STATS: tl.constexpr, TB: tl.constexpr):
    m, s, a, sp, b = _merge(part_row, n_tiles, P, NEED_SUM, TOKEN_STATS, TB)
    z_t = tl.load(target_ptr + row, mask=on_slice, other=0.0)
    y_t = tl.where(on_slice, _cap(z_t, cap, HAS_CAP), 0.0)
    return m, s, y_t, a, sp, b, z_t


@triton.jit
def _stats_kernel(part_ptr, target_ptr, labels_ptr, stats_ptr, n_tiles, V_local, vocab_start,
                  ignore_index, cap, P: tl.constexpr, HAS_CAP: tl.constexpr,
                  NEED_SUM: tl.constexpr, TOKEN_STATS: tl.constexpr, N_STATS: tl.constexpr,
                  TB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    local, on_slice, _ = _row_target(labels_ptr, row, vocab_start, V_local, ignore_index)
    m, s, y_t, a, sp, b, _ = _row_stats_of(part_ptr + row * n_tiles * P, target_ptr, row,
                                           n_tiles, local, on_slice, cap, P, HAS_CAP, NEED_SUM,
                                           TOKEN_STATS, TB)
    # the argmax is global already (vocab_start added by the GEMM)
    _store_stats(stats_ptr + row * N_STATS, m, s, y_t, a, sp, b, 0, TOKEN_STATS)


@triton.jit
def _grad_kernel(e_ptr, out_ptr, stride, part_ptr, target_ptr, labels_ptr, lse_ptr, scale_ptr,
                 stride_scale, n_tiles, V_local, vocab_start, ignore_index, smoothing, z_loss,
                 inv_vocab, cap, P: tl.constexpr, HAS_CAP: tl.constexpr, BN: tl.constexpr,
                 TPB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    local, on_slice, valid = _row_target(labels_ptr, row, vocab_start, V_local, ignore_index)
    z_t = tl.load(target_ptr + row, mask=on_slice, other=0.0)
    _grad(e_ptr + row * stride, out_ptr + row * stride, part_ptr + row * n_tiles * P, n_tiles,
          V_local, tl.load(lse_ptr + row), tl.load(scale_ptr + row * stride_scale), z_t, local,
          on_slice, valid, smoothing, z_loss, inv_vocab, cap, P, HAS_CAP, BN, TPB)


@triton.jit
def _stats_and_grad_kernel(e_ptr, out_ptr, stride, part_ptr, target_ptr, labels_ptr, stats_ptr,
                           scale_ptr, n_tiles, V_local, vocab_start, ignore_index, smoothing,
                           z_loss, inv_vocab, cap, P: tl.constexpr, HAS_CAP: tl.constexpr,
                           NEED_SUM: tl.constexpr, TOKEN_STATS: tl.constexpr,
                           N_STATS: tl.constexpr, BN: tl.constexpr, TPB: tl.constexpr,
                           TB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    local, on_slice, valid = _row_target(labels_ptr, row, vocab_start, V_local, ignore_index)
    part_row = part_ptr + row * n_tiles * P
    m, s, y_t, a, sp, b, z_t = _row_stats_of(part_row, target_ptr, row, n_tiles, local,
                                             on_slice, cap, P, HAS_CAP, NEED_SUM, TOKEN_STATS,
                                             TB)
    _store_stats(stats_ptr + row * N_STATS, m, s, y_t, a, sp, b, 0, TOKEN_STATS)
    _grad(e_ptr + row * stride, out_ptr + row * stride, part_row, n_tiles, V_local,
          m + tl.log(s), tl.load(scale_ptr), z_t, local, on_slice, valid, smoothing, z_loss,
          inv_vocab, cap, P, HAS_CAP, BN, TPB)


def logits(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           labels: torch.Tensor, out: torch.Tensor, opts: LossOptions,
           token_stats: bool = False, scratch: torch.Tensor | None = None) -> Chunk:
    """The chunk's GEMM: E into `out` ([C, V_local], the inputs' 16-bit dtype), and the
    partials and target logits beside it (see the module docstring), in `scratch` where they
    fit (`side_buffers`)."""
    cfg = GEMM_CONFIG
    m, k = h_c.shape
    v = weight.shape[0]
    p = n_partials(opts, token_stats)
    n_tiles = triton.cdiv(v, cfg["BN"])
    partials, target = side_buffers(m, n_tiles, p, h_c.device, scratch)
    h_desc = TensorDescriptor.from_tensor(h_c, [cfg["BM"], cfg["BK"]])
    w_desc = TensorDescriptor.from_tensor(weight, [cfg["BN"], cfg["BK"]])
    grid = (triton.cdiv(m, cfg["BM"]) * n_tiles,)
    _logits_kernel[grid](
        h_desc, w_desc, bias if bias is not None else target, labels, out.view(torch.float16),
        out.stride(0), partials, target, m, v, k, opts.vocab_start,
        1.0 if opts.logit_softcap is None else opts.logit_softcap,
        HAS_BIAS=bias is not None, HAS_CAP=opts.logit_softcap is not None,
        NEED_SUM=bool(opts.label_smoothing), TOKEN_STATS=token_stats, P=p, **cfg)
    return Chunk(out, partials, target, cfg["BN"])


def _row_consts(chunk: Chunk, opts: LossOptions) -> dict:
    return dict(n_tiles=chunk.partials.shape[1], V_local=chunk.out.shape[1],
                vocab_start=opts.vocab_start, ignore_index=opts.ignore_index,
                cap=1.0 if opts.logit_softcap is None else opts.logit_softcap,
                P=chunk.partials.shape[2], HAS_CAP=opts.logit_softcap is not None,
                num_warps=_ROW_WARPS)


def _stats_consts(chunk: Chunk, opts: LossOptions, token_stats: bool) -> dict:
    return dict(NEED_SUM=bool(opts.label_smoothing), TOKEN_STATS=token_stats,
                N_STATS=6 if token_stats else 4,
                TB=min(1024, triton.next_power_of_2(chunk.partials.shape[1])))


def _grad_consts(chunk: Chunk, opts: LossOptions) -> dict:
    return dict(smoothing=float(opts.label_smoothing), z_loss=float(opts.z_loss),
                inv_vocab=1.0 / opts.vocab_size, BN=chunk.bn,
                TPB=max(1, min(_ROW_BLOCK // chunk.bn,
                               triton.next_power_of_2(chunk.partials.shape[1]))))


def row_stats(chunk: Chunk, labels: torch.Tensor, opts: LossOptions,
              token_stats: bool = False) -> torch.Tensor:
    stats = torch.empty(chunk.out.shape[0], 6 if token_stats else 4, dtype=torch.float32,
                        device=chunk.out.device)
    _stats_kernel[(chunk.out.shape[0],)](chunk.partials, chunk.target, labels, stats,
                                         **_stats_consts(chunk, opts, token_stats),
                                         **_row_consts(chunk, opts))
    return stats


def row_grad_(chunk: Chunk, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
              opts: LossOptions) -> None:
    out = chunk.out
    _grad_kernel[(out.shape[0],)](out.view(torch.float16), out, out.stride(0), chunk.partials,
                                  chunk.target, labels, lse, row_scale, row_scale.stride(0),
                                  **_grad_consts(chunk, opts), **_row_consts(chunk, opts))


def row_stats_and_grad_(chunk: Chunk, labels: torch.Tensor, scale: torch.Tensor,
                        opts: LossOptions, token_stats: bool = False) -> torch.Tensor:
    """Single rank only: the statistics, then out := scale * dloss/dz (scale: an fp32 device
    scalar), in one launch."""
    out = chunk.out
    stats = torch.empty(out.shape[0], 6 if token_stats else 4, dtype=torch.float32,
                        device=out.device)
    _stats_and_grad_kernel[(out.shape[0],)](
        out.view(torch.float16), out, out.stride(0), chunk.partials, chunk.target, labels, stats,
        scale, **_stats_consts(chunk, opts, token_stats), **_grad_consts(chunk, opts),
        **_row_consts(chunk, opts))
    return stats
