"""The epilogue GEMM of epilogue_triton, for Hopper (sm_90) in Gluon: persistent and
warp-specialized, so that one tile's epilogue runs under the next tile's MMAs.

epilogue_triton's plain Triton GEMM runs at 1.15-1.28x cuBLAS's time on an H200 with its
statistics epilogue (benchmarks/NOTES.md, attempt 22): the epilogue (an exponential, two row
reductions and a 16-bit store per logit, ~20% of a tile's main loop at D = 2048) stalls the
tensor cores, since nothing else is ready to issue. Here each program holds one multiprocessor
and three partitions share it:

  loader      1 warp: TMA loads of h and W blocks into one ring of STAGES shared-memory slots,
              in the order the tiles are consumed (an mbarrier pair per slot: ready / empty)
  consumer 0  4 warps (the default partition): the program's tiles 0, 2, 4, ...
  consumer 1  4 warps: tiles 1, 3, 5, ...

A consumer runs its tile's main loop, then its epilogue, while the other consumer's main loop
takes the following slots of the ring: the tensor cores stay busy whenever one of the two is in
its main loop (CUTLASS's "ping-pong" schedule).

The accumulation is promoted: the tensor cores sum each K block's 64 products from zero into a
partial, and fp32 adds (round to nearest) take it into the accumulator. The tensor cores' own
long sums truncate (a bias that grows with K: the loss on random inputs was off by up to
2.2e-6, the fp16 lse by 1.4e-4 at D = 4096, where eager's 16-bit rounding partly cancels it);
promoted, the loss error is 5.6e-9..6.3e-8 on random inputs and 3.5e-8..1.7e-7 on LM-like ones
(benchmarks/NOTES.md, attempt 28). The 128 x 128 accumulator leaves no registers for a second
full-width partial, so the tile is held as four 64 x 64 quarters with two quarter partials: two
MMAs in flight, each add under the next MMA. That costs time: the GEMM ~1.3x cuBLAS's mm, where
the same loop without promotion ran at 1.06-1.11x (the op +7%: accuracy first).

The epilogue is epilogue_triton's own (`tile_epilogue`, a Triton function called on this
kernel's accumulator layout): the per-(row, tile) partials and the fp32 target logit in its
format, and the tile of E, which leaves through the consumer's shared-memory tile and one TMA
store (with plain stores from the registers, the epilogue cost 10-14% of the GEMM's time
despite the ping-pong: benchmarks/NOTES.md, attempt 25). So its row passes (row_stats,
row_grad_, row_stats_and_grad_) read either GEMM's output. Gluon does not run in Triton's
interpreter: the CPU tests prove the format on epilogue_triton, the GPU tests prove this kernel
equal to it.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .epilogue_triton import Chunk, n_partials, side_buffers, store_tile, tile_epilogue
from .options import LossOptions

# constexpr: the kernels read them (host code takes .value)
BM, BN, BK = gl.constexpr(128), gl.constexpr(128), gl.constexpr(64)  # BN: the partials' tile
# 32 KB a slot, and a 32 KB tile of E per consumer for its TMA store: 192 KB of the 227 KB.
# Four slots, not five: the shared memory left to the L1 cache serves the epilogue's loads and
# the partials' stores (five slots and the E tiles leave ~30 KB: the GEMM ran 9-10% slower).
STAGES = gl.constexpr(4)
GROUP_M = gl.constexpr(16)
UNROLL = gl.constexpr(2)  # K blocks per drain of the promoted main loop
# registers per thread: the consumers hold a 128 x 128 fp32 accumulator (128 registers), two
# 64 x 64 partials (64) and the epilogue's temporaries; the loader only addresses
_CONSUMER_REGS, _LOADER_REGS = gl.constexpr(232), gl.constexpr(40)
_MAXNREG = 168


@gluon.jit
def _tile_origin(tile, n_m, n_n, GROUP: gl.constexpr):
    """Grouped order (GROUP token tiles walk the vocabulary together: L2 reuse of W)."""
    in_group = GROUP * n_n
    first_m = (tile // in_group) * GROUP
    size_m = gl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m * BM, pid_n


@gluon.jit
def _loader(p, ROLE: gl.constexpr):
    (h_desc, w_desc, a_bufs, b_bufs, ready, empty, turn, e_ptr, stride_e, part_ptr, target_ptr,
     bias_ptr, labels_ptr, M, V, K, vocab_start, cap, e_desc, e_bufs) = p
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(V, BN)
    n_k = gl.cdiv(K, BK)
    step = 0
    for tile in range(gl.program_id(0), n_m * n_n, gl.num_programs(0)):
        m0, pid_n = _tile_origin(tile, n_m, n_n, GROUP_M)
        for kk in range(n_k):
            s = step % STAGES
            mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, h_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(h_desc, [m0, kk * BK], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [pid_n * BN, kk * BK], bar, b_bufs.index(s))
            step += 1


@gluon.jit
def _join_cols(left, right, layout: gl.constexpr):
    """[H, W] and [H, W] -> [H, 2W] (left's columns first) in `layout`: with the quarters in
    the N = W wgmma layout and `layout` the N = 2W one, a renaming of registers."""
    x = gl.permute(gl.join(left, right), (0, 2, 1))
    return gl.convert_layout(gl.reshape(x, (left.shape[0], 2 * left.shape[1])), layout)


@gluon.jit
def _promoted_blocks(a_bufs, b_bufs, ready, empty, step, top_l, top_r, bot_l, bot_r, p1, p2,
                     U: gl.constexpr):
    """U K blocks from the ring's slots step, step + 1, ...: each block's product of each
    quarter of the tile (64 x 64) summed by the tensor cores from zero (use_acc=False) into p1
    or p2, then added to the quarter's accumulator by fp32 adds, which round to nearest. Two
    quarters' MMAs in flight, so an add runs under the next MMA. Straight-line code (U is
    unrolled): ptxas serializes every wgmma (C7514) where a partial is read that was in flight
    at the loop's back edge, so the last MMA is waited for at the end, and the tensor cores
    idle there once per U blocks."""
    H: gl.constexpr = BM // 2
    W: gl.constexpr = BN // 2
    for u in gl.static_range(U):
        s = (step + u) % STAGES
        mbarrier.wait(ready.index(s), ((step + u) // STAGES) & 1)
        a = a_bufs.index(s)
        b = b_bufs.index(s)
        a_top = a.slice(0, H)
        a_bot = a.slice(H, H)
        b_l = b.slice(0, W).permute((1, 0))
        b_r = b.slice(W, W).permute((1, 0))
        p1 = warpgroup_mma(a_top, b_l, p1, use_acc=False, is_async=True)
        if u > 0:  # the block before: its last MMA has completed, and with it its slot
            p1, p2 = warpgroup_mma_wait(1, deps=(p1, p2))
            bot_r += p2
            mbarrier.arrive(empty.index((step + u - 1) % STAGES))
        p2 = warpgroup_mma(a_top, b_r, p2, use_acc=False, is_async=True)
        p1, p2 = warpgroup_mma_wait(1, deps=(p1, p2))
        top_l += p1
        p1 = warpgroup_mma(a_bot, b_l, p1, use_acc=False, is_async=True)
        p1, p2 = warpgroup_mma_wait(1, deps=(p1, p2))
        top_r += p2
        p2 = warpgroup_mma(a_bot, b_r, p2, use_acc=False, is_async=True)
        p1, p2 = warpgroup_mma_wait(1, deps=(p1, p2))
        bot_l += p1
    p2 = warpgroup_mma_wait(0, deps=(p2,))
    bot_r += p2
    mbarrier.arrive(empty.index((step + U - 1) % STAGES))
    return top_l, top_r, bot_l, bot_r, p1, p2


@gluon.jit
def _promoted_main_loop(a_bufs, b_bufs, ready, empty, turn, step, n_k, ROLE: gl.constexpr,
                        out_layout: gl.constexpr):
    """The tile's product as two [64, BN] halves (out_layout), each K block's partial sums
    added to the accumulator in fp32; the other consumer's turn once all its slots are in."""
    H: gl.constexpr = BM // 2
    W: gl.constexpr = BN // 2
    q: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                instr_shape=[16, W, 16])
    top_l = gl.zeros((H, W), gl.float32, q)
    top_r = gl.zeros((H, W), gl.float32, q)
    bot_l = gl.zeros((H, W), gl.float32, q)
    bot_r = gl.zeros((H, W), gl.float32, q)
    p1 = gl.zeros((H, W), gl.float32, q)
    p2 = gl.zeros((H, W), gl.float32, q)
    for _ in range(n_k // UNROLL):
        top_l, top_r, bot_l, bot_r, p1, p2 = _promoted_blocks(
            a_bufs, b_bufs, ready, empty, step, top_l, top_r, bot_l, bot_r, p1, p2, UNROLL)
        step += UNROLL
    for _ in range(n_k % UNROLL):
        top_l, top_r, bot_l, bot_r, p1, p2 = _promoted_blocks(
            a_bufs, b_bufs, ready, empty, step, top_l, top_r, bot_l, bot_r, p1, p2, 1)
        step += 1
    mbarrier.arrive(turn.index(1 - ROLE))  # all slots of this tile are in: the other's turn
    return _join_cols(top_l, top_r, out_layout), _join_cols(bot_l, bot_r, out_layout)


@gluon.jit
def _consumer(p, ROLE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_CAP: gl.constexpr,
              NEED_SUM: gl.constexpr, TOKEN_STATS: gl.constexpr, P: gl.constexpr,
              TMA_STORE: gl.constexpr):
    (h_desc, w_desc, a_bufs, b_bufs, ready, empty, turn, e_ptr, stride_e, part_ptr, target_ptr,
     bias_ptr, labels_ptr, M, V, K, vocab_start, cap, e_desc, e_bufs) = p
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BN, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, mma)
    col_l: gl.constexpr = gl.SliceLayout(0, mma)
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(V, BN)
    n_k = gl.cdiv(K, BK)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    n_local = gl.cdiv(n_m * n_n - pid, nprog)  # this program's tiles
    for idx in range(ROLE, n_local, 2):
        m0, pid_n = _tile_origin(pid + idx * nprog, n_m, n_n, GROUP_M)
        step = idx * n_k  # the ring is filled in tile order: this tile's first slot
        # consumer 0's first turn is free (a fresh barrier passes a wait on parity 1)
        mbarrier.wait(turn.index(ROLE), ((idx // 2) & 1) ^ (1 - ROLE))
        top, bot = _promoted_main_loop(a_bufs, b_bufs, ready, empty, turn, step, n_k, ROLE, mma)
        # the epilogue by halves of 64 rows (its registers: one half's, beside the other's)
        offs_n = gl.arange(0, BN, layout=col_l)
        if TMA_STORE:  # E through shared memory: one bulk store, the edges clipped by TMA
            e_smem = e_bufs.index(ROLE)
            tma.store_wait(0)  # this consumer's previous tile has left the buffer
        for half in gl.static_range(2):
            rows = m0 + half * (BM // 2) + gl.arange(0, BM // 2, layout=row_l)
            if half == 0:
                acc = top
            else:
                acc = bot
            e = tile_epilogue(acc, rows, offs_n, pid_n, n_n, bias_ptr, labels_ptr, part_ptr,
                              target_ptr, M, V, vocab_start, cap, HAS_BIAS, HAS_CAP, NEED_SUM,
                              TOKEN_STATS, P, BN)
            if TMA_STORE:
                e_smem.slice(half * (BM // 2), BM // 2).store(e)
            else:
                store_tile(e_ptr, stride_e, rows, offs_n, pid_n, e, M, V, BN)
        if TMA_STORE:
            fence_async_shared()
            tma.async_copy_shared_to_global(e_desc, [m0, pid_n * BN], e_smem)
    if TMA_STORE:
        tma.store_wait(0)


@gluon.jit
def _logits_kernel(h_desc, w_desc, e_desc, e_ptr, stride_e, part_ptr, target_ptr, bias_ptr,
                   labels_ptr, M, V, K, vocab_start, cap, HAS_BIAS: gl.constexpr,
                   HAS_CAP: gl.constexpr, NEED_SUM: gl.constexpr, TOKEN_STATS: gl.constexpr,
                   P: gl.constexpr, TMA_STORE: gl.constexpr):
    dtype: gl.constexpr = h_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], h_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    # the consumers' main loops take turns (turn[c]: consumer c's), so the one waiting on the
    # ring is never a round ahead of the loader: an mbarrier's phase is known by parity only
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    # each consumer's tile of E on its way out (a stub where the rows take plain stores)
    e_bufs = gl.allocate_shared_memory(gl.float16, [2] + e_desc.block_type.shape, e_desc.layout)
    p = (h_desc, w_desc, a_bufs, b_bufs, ready, empty, turn, e_ptr, stride_e, part_ptr,
         target_ptr, bias_ptr, labels_ptr, M, V, K, vocab_start, cap, e_desc, e_bufs)
    gl.warp_specialize([
        (_consumer, (p, 0, HAS_BIAS, HAS_CAP, NEED_SUM, TOKEN_STATS, P, TMA_STORE)),
        (_consumer, (p, 1, HAS_BIAS, HAS_CAP, NEED_SUM, TOKEN_STATS, P, TMA_STORE)),
        (_loader, (p, 2)),
    ], [4, 1], [_CONSUMER_REGS, _LOADER_REGS])


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def runs_here(device: torch.device) -> bool:
    """Hopper only (wgmma, 192 KB of shared memory), and not in Triton's interpreter."""
    return (device.type == "cuda" and not triton.knobs.runtime.interpret
            and torch.cuda.get_device_capability(device)[0] == 9)


def logits(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           labels: torch.Tensor, out: torch.Tensor, opts: LossOptions,
           token_stats: bool = False, scratch: torch.Tensor | None = None) -> Chunk:
    """epilogue_triton.logits' contract: E into `out`, the partials and target logits beside
    (in `scratch` where they fit)."""
    m, k = h_c.shape
    v = weight.shape[0]
    p = n_partials(opts, token_stats)
    n_tiles = triton.cdiv(v, BN.value)
    partials, target = side_buffers(m, n_tiles, p, h_c.device, scratch)
    dtype = _GL_DTYPE[h_c.dtype]
    h_desc = TensorDescriptor.from_tensor(
        h_c, [BM.value, BK.value], gl.NVMMASharedLayout.get_default_for([BM.value, BK.value], dtype))
    w_desc = TensorDescriptor.from_tensor(
        weight, [BN.value, BK.value],
        gl.NVMMASharedLayout.get_default_for([BN.value, BK.value], dtype))
    e = out.view(torch.float16)
    # a TMA store needs 16-byte aligned rows (V_local a multiple of 8); else plain stores
    tma_store = e.stride(1) == 1 and e.stride(0) % 8 == 0 and e.data_ptr() % 16 == 0
    e_block = [BM.value, BN.value] if tma_store else [1, 8]
    e_desc = TensorDescriptor.from_tensor(
        e if tma_store else torch.empty(1, 8, dtype=torch.float16, device=e.device), e_block,
        gl.NVMMASharedLayout.get_default_for(e_block, gl.float16))
    sms = torch.cuda.get_device_properties(h_c.device).multi_processor_count
    grid = (min(sms, triton.cdiv(m, BM.value) * n_tiles),)
    _logits_kernel[grid](
        h_desc, w_desc, e_desc, e, out.stride(0), partials, target,
        bias if bias is not None else target, labels, m, v, k, opts.vocab_start,
        1.0 if opts.logit_softcap is None else opts.logit_softcap,
        HAS_BIAS=bias is not None, HAS_CAP=opts.logit_softcap is not None,
        NEED_SUM=bool(opts.label_smoothing), TOKEN_STATS=token_stats, P=p, TMA_STORE=tma_store,
        num_warps=4, maxnreg=_MAXNREG)
    return Chunk(out, partials, target, BN.value)
