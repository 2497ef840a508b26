"""The epilogue GEMM of epilogue_triton, for Hopper (sm_90) in Gluon: persistent and
warp-specialized, so that one tile's epilogue runs under the next tile's MMAs.

epilogue_triton's plain Triton GEMM runs at 1.15-1.28x cuBLAS's time on an H200 with its
statistics epilogue (benchmarks/NOTES.md, attempt 22): the epilogue (an exponential, two row
reductions and a 16-bit store per logit, ~20% of a tile's main loop at D = 2048) stalls the
tensor cores, since nothing else is ready to issue. Here each program holds one multiprocessor
and three partitions share it:

  loader    1 warp: TMA loads of h and W blocks into one ring of STAGES shared-memory slots,
            in the order the tiles are consumed (an mbarrier pair per slot: ready / empty)
  consumers 8 warps: the tile's main loop, as one 8-warp partition (the default) or as two
            4-warp partitions of 64 rows each (the `Schedule`, below); the accumulator then
            goes to the epilogue through a shared-memory staging tile (an mbarrier pair:
            acc_full / acc_empty)
  epilogue  4 warps: the tile's epilogue, EPI_ROWS rows a step, under the consumer's next
            main loop

The accumulation is promoted: the tensor cores sum a chain of K blocks' products from zero into a
partial, and fp32 adds (round to nearest) take it into the accumulator. The tensor cores' own
long sums truncate (a bias that grows with K: the loss on random inputs was off by up to
2.2e-6, the fp16 lse by 1.4e-4 at D = 4096, where eager's 16-bit rounding partly cancels it);
promoted, the loss error is 5.6e-9..6.3e-8 on random inputs and 3.5e-8..1.7e-7 on LM-like ones
(benchmarks/NOTES.md, attempt 28). Two full-width partials alternate, so one partial's adds
run under the other's MMAs; they and the accumulator take 192 of a consumer thread's registers,
which is why the epilogue lives in its own partition: a consumer that also ran the epilogue had
room only for quarter-tile partials, the GEMM ~1.3x cuBLAS's mm; this one runs at 1.16-1.20x
(attempts 32-35).

The epilogue is epilogue_triton's own (`tile_epilogue`, a Triton function called on this
kernel's layout): the per-(row, tile) partials and the fp32 target logit in its format, and
the tile of E, which leaves through shared memory by TMA stores (with plain stores from the
registers, the epilogue cost 10-14% of the GEMM's time: benchmarks/NOTES.md, attempt 25). So
its row passes (row_stats, row_grad_, row_stats_and_grad_) read either GEMM's output. Gluon
does not run in Triton's interpreter: the CPU tests prove the format on epilogue_triton, the
GPU tests prove this kernel equal to it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

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
# shared memory: STAGES slots of 32 KB and the 64 KB fp32 staging tile (E leaves from it):
# 224 KB of the 227 KB
STAGES = gl.constexpr(5)
EPI_ROWS = gl.constexpr(16)  # the epilogue's rows per step (a step's E leaves by one TMA store)
GROUP_M = gl.constexpr(16)
# registers per thread, of 64K per multiprocessor at 512 threads x _MAXNREG (the loader's warp
# counts as a warp group): a consumer thread holds its rows' accumulator and two partials
# (3 x 64), (65536 - 128 x (72 + 24)) / 256 = 208; the epilogue's 72 hold a 16-row step (8 rows
# a step and 56 registers: the epilogue, latency-bound, outlasted the main loop at D = 2048,
# the GEMM 1.32x cuBLAS's mm against 1.20x)
_CONSUMER_REGS = gl.constexpr(208)  # each consumer partition's, where there are two
_EPILOGUE_REGS, _LOADER_REGS = gl.constexpr(72), gl.constexpr(24)
_CONSUMER_WARPS, _EPILOGUE_WARPS = gl.constexpr(8), gl.constexpr(4)  # consumers: all of them
_MAXNREG = 128


class Schedule(NamedTuple):
    """How the consumer warps share a tile's main loop. Each consumer issues its rows' MMAs
    and drains them once per run of 2 `chain` K blocks (the last MMA waited for, then the
    second partial's adds): the tensor cores idle there unless another consumer's MMAs are
    queued. One 8-warp consumer runs both warp groups in lockstep (Triton syncs the partition
    at every mbarrier wait), so their drains coincide; two 4-warp consumers run apart, and
    with `skew` the second starts each tile with that many blocks alone (each drained), so
    that its runs' drains fall between the first's. Which is faster is the GPU's to say:
    benchmarks/kernel/gemm.py --schedules times them side by side (benchmarks/NOTES.md,
    attempts 33-36)."""
    consumers: int = 1  # 1: one 8-warp partition, the tile's 128 rows; 2: two 4-warp, 64 rows each
    chain: int = 2  # K blocks per partial (its fp32 adds once per chain)
    skew: int = 0  # 2 consumers: the K blocks the second runs alone at each tile's start

    @property
    def name(self) -> str:
        """e.g. 2x2skew1: two consumers, chains of 2 blocks, the second a block behind."""
        return f"{self.consumers}x{self.chain}" + (f"skew{self.skew}" if self.skew else "")

    @classmethod
    def from_name(cls, name: str) -> "Schedule":
        m = re.fullmatch(r"(\d+)x(\d+)(?:skew(\d+))?", name)
        if not m:
            raise ValueError(f"schedule {name!r} is not CONSUMERSxCHAIN[skewBLOCKS] "
                             "(e.g. 2x2skew1)")
        return cls(int(m[1]), int(m[2]), int(m[3] or 0)).check()

    def check(self) -> "Schedule":
        if self.consumers not in (1, 2):
            raise ValueError(f"Schedule.consumers must be 1 or 2, got {self.consumers!r}")
        # a run holds 2 chain slots and waits for no other: with two consumers, each needing
        # the other's release of slot j - STAGES, a deadlock needs a run longer than the ring
        if not 1 <= self.chain <= STAGES.value // 2:
            raise ValueError(f"Schedule.chain must be 1..{STAGES.value // 2} (a run of 2 chain "
                             f"blocks within the ring's {STAGES.value} slots), got {self.chain!r}")
        if self.skew and self.consumers != 2:
            raise ValueError("Schedule.skew needs consumers=2 (it staggers the second consumer)")
        if not 0 <= self.skew <= self.chain:  # past a chain, the skew repeats a run's phase
            raise ValueError(f"Schedule.skew must be 0..chain ({self.chain}), got {self.skew!r}")
        return self


SCHEDULE = Schedule()  # the op's: one 8-warp consumer (attempt 35, the landed timing)
# the ones the GPU is to time against it (attempt 36): two consumers, skewed by a block, by
# half a run, or not at all
CANDIDATES = (Schedule(consumers=2, chain=2, skew=1), Schedule(consumers=2, chain=2, skew=2),
              Schedule(consumers=2, chain=1, skew=1), Schedule(consumers=2, chain=2))


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
def _loader(p):
    (h_desc, w_desc, a_bufs, b_bufs, ready, empty, acc_smem, acc_full, acc_empty, e_ptr,
     stride_e, part_ptr, target_ptr, bias_ptr, labels_ptr, M, V, K, vocab_start, cap,
     e_desc) = p
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
def _chain(a_bufs, b_bufs, ready, first, part, ROW0: gl.constexpr, ROWS: gl.constexpr,
           C: gl.constexpr):
    """Issues the MMAs of rows ROW0 .. ROW0 + ROWS - 1 and the C K blocks in slots first,
    first + 1, ... into `part`, the first from zero (use_acc=False): the tensor cores' sum of
    C x BK products."""
    for c in gl.static_range(C):
        s = (first + c) % STAGES
        mbarrier.wait(ready.index(s), ((first + c) // STAGES) & 1)
        part = warpgroup_mma(a_bufs.index(s).slice(ROW0, ROWS), b_bufs.index(s).permute((1, 0)),
                             part, use_acc=c > 0, is_async=True)
    return part


@gluon.jit
def _release(empty, first, C: gl.constexpr):
    for c in gl.static_range(C):
        mbarrier.arrive(empty.index((first + c) % STAGES))


@gluon.jit
def _promoted_run(a_bufs, b_bufs, ready, empty, step, acc, p1, p2, ROW0: gl.constexpr,
                  ROWS: gl.constexpr, C: gl.constexpr, PAIR: gl.constexpr):
    """C K blocks from the ring's slot `step` into p1 (and with PAIR the next C into p2), each
    partial then added to the accumulator in fp32, p1's adds under p2's MMAs. Straight-line
    code that waits for its last MMA: ptxas serializes every wgmma (C7514) where a partial in
    flight at a loop's back edge is read, and a second pair in the run (the next p1 issued
    before p2's wait) spills at 208 registers (C7512), so this consumer's MMAs drain once per
    run."""
    p1 = _chain(a_bufs, b_bufs, ready, step, p1, ROW0, ROWS, C)
    if PAIR:
        p2 = _chain(a_bufs, b_bufs, ready, step + C, p2, ROW0, ROWS, C)
        p1, p2 = warpgroup_mma_wait(C, deps=(p1, p2))  # p1's MMAs are done, p2's may not be
        acc += p1
        _release(empty, step, C)
        p2 = warpgroup_mma_wait(0, deps=(p2,))
        acc += p2
        _release(empty, step + C, C)
    else:
        p1 = warpgroup_mma_wait(0, deps=(p1,))
        acc += p1
        _release(empty, step, C)
    return acc, p1, p2


@gluon.jit
def _blocks(a_bufs, b_bufs, ready, empty, step, n, acc, p1, p2, ROW0: gl.constexpr,
            ROWS: gl.constexpr, CHAIN: gl.constexpr):
    """n K blocks from slot `step` on: runs of 2 CHAIN, then pairs of single blocks, then the
    odd one."""
    for _ in range(n // (2 * CHAIN)):
        acc, p1, p2 = _promoted_run(a_bufs, b_bufs, ready, empty, step, acc, p1, p2, ROW0, ROWS,
                                    CHAIN, True)
        step += 2 * CHAIN
    for _ in range(n % (2 * CHAIN) // 2):
        acc, p1, p2 = _promoted_run(a_bufs, b_bufs, ready, empty, step, acc, p1, p2, ROW0, ROWS,
                                    1, True)
        step += 2
    if n % 2 == 1:
        acc, p1, p2 = _promoted_run(a_bufs, b_bufs, ready, empty, step, acc, p1, p2, ROW0, ROWS,
                                    1, False)
    return acc, p1, p2


@gluon.jit
def _consumer(p, PART: gl.constexpr, CONSUMERS: gl.constexpr, CHAIN: gl.constexpr,
              SKEW: gl.constexpr):
    """Consumer PART of CONSUMERS (`Schedule`): its rows of every tile, the main loop, then its
    accumulator into its rows of the staging tile."""
    (h_desc, w_desc, a_bufs, b_bufs, ready, empty, acc_smem, acc_full, acc_empty, e_ptr,
     stride_e, part_ptr, target_ptr, bias_ptr, labels_ptr, M, V, K, vocab_start, cap,
     e_desc) = p
    ROWS: gl.constexpr = BM // CONSUMERS
    ROW0: gl.constexpr = PART * ROWS
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[_CONSUMER_WARPS // CONSUMERS, 1],
        instr_shape=[16, BN, 16])
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(V, BN)
    n_k = gl.cdiv(K, BK)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    for idx in range(gl.cdiv(n_m * n_n - pid, nprog)):  # this program's tiles
        step = idx * n_k  # the ring is filled in tile order: this tile's first slot
        acc = gl.zeros((ROWS, BN), gl.float32, mma)
        p1 = gl.zeros((ROWS, BN), gl.float32, mma)
        p2 = gl.zeros((ROWS, BN), gl.float32, mma)
        if SKEW > 0 and PART == 1:  # blocks alone first: its drains fall between the other's
            head = gl.minimum(n_k, SKEW)
            for _ in range(head):
                acc, p1, p2 = _promoted_run(a_bufs, b_bufs, ready, empty, step, acc, p1, p2,
                                            ROW0, ROWS, 1, False)
                step += 1
            acc, p1, p2 = _blocks(a_bufs, b_bufs, ready, empty, step, n_k - head, acc, p1, p2,
                                  ROW0, ROWS, CHAIN)
        else:
            acc, p1, p2 = _blocks(a_bufs, b_bufs, ready, empty, step, n_k, acc, p1, p2, ROW0,
                                  ROWS, CHAIN)
        # the epilogue has read the previous tile (a fresh barrier passes a wait on parity 1)
        mbarrier.wait(acc_empty.index(0), (idx & 1) ^ 1)
        acc_smem.slice(ROW0, ROWS).store(acc)
        gl.thread_barrier()  # every warp's rows are in before this consumer's one arrive
        mbarrier.arrive(acc_full.index(0))


@gluon.jit
def _epilogue(p, HAS_BIAS: gl.constexpr, HAS_CAP: gl.constexpr, NEED_SUM: gl.constexpr,
              TOKEN_STATS: gl.constexpr, P: gl.constexpr, TMA_STORE: gl.constexpr):
    (h_desc, w_desc, a_bufs, b_bufs, ready, empty, acc_smem, acc_full, acc_empty, e_ptr,
     stride_e, part_ptr, target_ptr, bias_ptr, labels_ptr, M, V, K, vocab_start, cap,
     e_desc) = p
    # a warp per row, 16-byte shared-memory loads
    rows_l: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [_EPILOGUE_WARPS, 1], [1, 0])
    row_l: gl.constexpr = gl.SliceLayout(1, rows_l)
    col_l: gl.constexpr = gl.SliceLayout(0, rows_l)
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(V, BN)
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    offs_n = gl.arange(0, BN, layout=col_l)
    # the staging tile by steps of rows: the same bytes (the swizzle's period, 8 rows, divides
    # a step), indexable by a loop's counter where slices take constants
    steps = acc_smem._reinterpret(gl.float32, [BM // EPI_ROWS, EPI_ROWS, BN], acc_smem.layout)
    # a step's E leaves from the first half of the step's own fp32 bytes (no tile of its own:
    # those 32 KB are a ring slot)
    e_steps = acc_smem._reinterpret(gl.float16, [2 * BM // EPI_ROWS, EPI_ROWS, BN], e_desc.layout)
    for idx in range(gl.cdiv(n_m * n_n - pid, nprog)):
        m0, pid_n = _tile_origin(pid + idx * nprog, n_m, n_n, GROUP_M)
        # each step's labels are loaded a step ahead: the load's latency (L2, ~1/3 of a step)
        # off the steps' chain
        rows = m0 + gl.arange(0, EPI_ROWS, layout=row_l)
        label = gl.load(labels_ptr + rows, mask=rows < M, other=-1)
        mbarrier.wait(acc_full.index(0), idx & 1)
        for i in range(BM // EPI_ROWS):
            acc = steps.index(i).load(rows_l)
            rows_next = rows + EPI_ROWS
            label_next = gl.load(labels_ptr + rows_next, mask=rows_next < M, other=-1)
            e = tile_epilogue(acc, rows, label, offs_n, pid_n, n_n, bias_ptr, part_ptr,
                              target_ptr, M, V, vocab_start, cap, HAS_BIAS, HAS_CAP, NEED_SUM,
                              TOKEN_STATS, P, BN)
            if TMA_STORE:  # the rows past M and the columns past V clipped by TMA
                gl.thread_barrier()  # every warp has read the step's rows before E lands there
                e_smem = e_steps.index(2 * i)
                e_smem.store(e)
                fence_async_shared()
                tma.async_copy_shared_to_global(e_desc, [m0 + i * EPI_ROWS, pid_n * BN], e_smem)
            else:
                store_tile(e_ptr, stride_e, rows, offs_n, pid_n, e, M, V, BN)
            rows = rows_next
            label = label_next
        if TMA_STORE:
            tma.store_wait(0)  # E has left the staging tile
        gl.thread_barrier()  # and every warp has read its rows, before the one arrive
        mbarrier.arrive(acc_empty.index(0))


@gluon.jit
def _logits_kernel(h_desc, w_desc, e_desc, e_ptr, stride_e, part_ptr, target_ptr, bias_ptr,
                   labels_ptr, M, V, K, vocab_start, cap, HAS_BIAS: gl.constexpr,
                   HAS_CAP: gl.constexpr, NEED_SUM: gl.constexpr, TOKEN_STATS: gl.constexpr,
                   P: gl.constexpr, TMA_STORE: gl.constexpr, CONSUMERS: gl.constexpr,
                   CHAIN: gl.constexpr, SKEW: gl.constexpr):
    dtype: gl.constexpr = h_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BM, BK], h_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)  # every consumer's MMAs have read it
    # the accumulator's staging tile, by steps of the epilogue's rows; the 16-byte units of a
    # row permuted by its index mod 8, so that neither side's accesses collide in banks
    staging_l: gl.constexpr = gl.SwizzledSharedLayout(4, 1, 8, [1, 0])
    acc_smem = gl.allocate_shared_memory(gl.float32, [BM, BN], staging_l)
    acc_full = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    acc_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(acc_full.index(0), count=CONSUMERS)  # every consumer's rows are in
    mbarrier.init(acc_empty.index(0), count=1)
    p = (h_desc, w_desc, a_bufs, b_bufs, ready, empty, acc_smem, acc_full, acc_empty, e_ptr,
         stride_e, part_ptr, target_ptr, bias_ptr, labels_ptr, M, V, K, vocab_start, cap, e_desc)
    if CONSUMERS == 1:  # the default partition is the consumer, with what the workers leave
        gl.warp_specialize([
            (_consumer, (p, 0, 1, CHAIN, SKEW)),
            (_epilogue, (p, HAS_BIAS, HAS_CAP, NEED_SUM, TOKEN_STATS, P, TMA_STORE)),
            (_loader, (p,)),
        ], [_EPILOGUE_WARPS, 1], [_EPILOGUE_REGS, _LOADER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (p, 0, 2, CHAIN, SKEW)),
            (_consumer, (p, 1, 2, CHAIN, SKEW)),
            (_epilogue, (p, HAS_BIAS, HAS_CAP, NEED_SUM, TOKEN_STATS, P, TMA_STORE)),
            (_loader, (p,)),
        ], [_CONSUMER_WARPS // 2, _EPILOGUE_WARPS, 1],
            [_CONSUMER_REGS, _EPILOGUE_REGS, _LOADER_REGS])


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def runs_here(device: torch.device) -> bool:
    """Hopper only (wgmma, 224 KB of shared memory), and not in Triton's interpreter."""
    return (device.type == "cuda" and not triton.knobs.runtime.interpret
            and torch.cuda.get_device_capability(device)[0] == 9)


def logits(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           labels: torch.Tensor, out: torch.Tensor, opts: LossOptions,
           token_stats: bool = False, scratch: torch.Tensor | None = None,
           schedule: Schedule = SCHEDULE) -> Chunk:
    """epilogue_triton.logits' contract: E into `out`, the partials and target logits beside
    (in `scratch` where they fit). `schedule`: the consumers' (benchmarks and tests time and
    check the others)."""
    schedule.check()
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
    e_block = [EPI_ROWS.value, BN.value] if tma_store else [1, 8]
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
        CONSUMERS=schedule.consumers, CHAIN=schedule.chain, SKEW=schedule.skew,
        num_warps=_CONSUMER_WARPS.value // schedule.consumers, maxnreg=_MAXNREG)
    return Chunk(out, partials, target, BN.value)
