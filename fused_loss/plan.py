"""The chunk plan: how many token rows per chunk, and whether dW is carried across chunks in
fp32; chosen per call from a cost model of time and memory, under the user's cap.

A plan of C rows runs ceil(N / C) chunks through ONE reused [C, V_local] logits buffer (see
chunked.py). With more than one chunk and `weight_grad_fp32`, dW is carried across the
chunks in an fp32 buffer that stands in for the 16-bit dW until the backward rounds it (as
accurate as eager's one GEMM); one chunk needs no carry at all.

Cost model (per call, forward + backward of the "sum" op; N rows, D, V = V_local, e = the
inputs' element size, k = the number of chunks):

  time  = GEMM FLOPs / GEMM_FLOPS_PER_S[e]      6NDV with a gradient, 2NDV without
        + pass bytes / HBM_BYTES_PER_S           the logits: 3 passes of N*V*e with a gradient
                                                 (the GEMM's write, the row pass's read and
                                                 in-place write), 2 without; the backward's
                                                 scale pass over dW (read V*D*c, write V*D*e,
                                                 c = 4 with the fp32 carry, else e) and over
                                                 dh (read N*D*4, write N*D*e) where it runs:
                                                 with the upstream gradient announced (no
                                                 fp32 dh) its factor is exactly 1 and the
                                                 in-place passes are skipped, leaving only
                                                 the carry's rounding
        + (k - 1) * 8*V*D / HBM_BYTES_PER_S      with the fp32 carry: each extra chunk re-reads
                                                 and re-writes it (a 16-bit dW accumulates in
                                                 the GEMM's epilogue at no measured cost:
                                                 the bf16 carry ties torch.compile)
        + k * PER_CHUNK_S                        launches and the GEMMs' tails, per chunk
  workspace = the larger of two moments (above the inputs and their 16-bit gradients):
    forward:  min(C, N)*V*e                      the logits buffer
            + (carry ? V*D*(4 - e) : 0)          the fp32 carry net of the dW it stands for
            + (fp32 dh ? N*D*(4 - e) : 0)        the fp32 dh net of dh (see chunked._input_grad;
                                                 none where the upstream gradient is known in
                                                 the forward: grad_scale, "mean"): the same
                                                 for every plan
    backward: (carry ? V*D*4 : 0)                the carry beside the dW it is rounded into
                                                 (measured: 4.00 GiB at 8192 x 4096 x 262144,
                                                 where the forward moment is 3.06)
  Not counted: the "epilogue" path's side buffers (its partials, 1/32 to 1/13 of the
  buffer's bytes), which live in gradient storage not yet written (chunked._unwritten): all
  of them at one chunk, and at the others where dh's remaining rows hold them.

The constants are an H200's (bf16 dense GEMM ~680 TFLOP/s sustained, HBM ~4.0 TB/s effective)
and serve the prediction (`ChunkPlan.predicted_ms`, printed beside measurements); the choice
does not hinge on them: the time only grows with the number of chunks and with the carry.

Choice: the capped plan is the fewest chunks whose logits buffer fits the cap
(`chunk_budget_bytes`, `[fused_ce] chunk_budget_mib`, default 1 GiB; balanced, rounded up to 128
rows: see `_capped_rows`), the fastest predicted of those that fit. Its workspace, not its buffer,
is what the plan may not exceed: ONE chunk (no carry) replaces it where it is no worse in both
workspace and predicted time; else, where the backward's moment (the carry, V*D*4) is the larger
one, the buffer grows to fill the forward's moment up to it (fewer chunks: fewer re-reads of the
carry, at no memory: 7 -> 4 chunks at 16384 x 5120 x 202048). So a buffer may hold more logits
than the cap, but the plan never more memory than the capped plan would. An explicit chunk_size
forces the rows (its prediction is still reported).

Vocabulary parallel: every rank of the group must run the same chunks (each chunk does one
collective). The plan depends on its arguments alone, so callers pass values equal on every
rank: `group_v_local` (the largest slice of an even split) instead of a rank's own V_local.
"""

from __future__ import annotations

import dataclasses

DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30  # the cap on one [chunk, V_local] logits buffer
WIDEST_ELEMENT_SIZE = 4  # fp32: the widest dtype the op takes
ROW_ROUNDING = 128  # chunk rows are rounded up to this (full GEMM tiles) where the cap allows

# The cost model's constants (an H200; for the prediction, see the module docstring)
GEMM_FLOPS_PER_S = {2: 680e12, 4: 50e12}  # by element size: bf16/fp16 dense; fp32 (no TF32)
HBM_BYTES_PER_S = 4.0e12
PER_CHUNK_S = 30e-6
FP32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """rows per chunk, n_chunks = ceil(N / rows), carry_fp32: dW carried across the chunks in
    fp32; predicted_ms and workspace_bytes: the cost model's time and memory (see the module
    docstring; workspace above the inputs and their 16-bit gradients)."""

    rows: int
    n_chunks: int
    carry_fp32: bool
    predicted_ms: float
    workspace_bytes: int


# each path of logits_path, as a start-up line names it
LOGITS_PATHS = {
    "epilogue": "statistics from the Triton GEMM's fp32 accumulator",
    "fp32": "statistics from the fp32 product",
    "vendor": "statistics from the vendor GEMM's logits in the inputs' dtype",
}


def logits_path(backend: str, element_size: int, d: int, *, fp32_statistics: bool, tma: bool,
                softcap_with_smoothing: bool = False) -> str:
    """Where a chunk's logits and their row statistics come from (the start-up line names it).
    With fp32_statistics (16-bit inputs; fp32 inputs have fp32 logits on every path):

      "epilogue"  backend triton: the Triton GEMM whose epilogue takes the statistics and
                  exponentials from its fp32 accumulator (epilogue_triton); needs TMA (`tma`: a
                  CUDA GPU of compute capability >= 9 and 16-byte aligned inputs, or the
                  interpreter), rows of D * element_size bytes in multiples of 16, and not a
                  softcap together with label smoothing (see epilogue_triton)
      "fp32"      backend torch: the fp32 product of the inputs (16-bit inputs multiplied
                  exactly, accumulated in fp32), torch's row passes on it
    Otherwise, and where the epilogue cannot run:
      "vendor"    the vendor GEMM's logits in the inputs' dtype (16-bit inputs: rounded to 16
                  bits before the statistics, as eager's), the backend's row passes in place

    Not the default (benchmarks/RESULTS.md, "statistics from the fp32 accumulator"): on an H200
    (the Gluon GEMM, its accumulation promoted to round-to-nearest fp32 adds) its loss error is
    below eager's at every sweep point, far below on LM-like inputs, at the default's memory,
    but it runs at 1.005-1.11x torch.compile's time, up to 12% slower than the default path,
    which is as accurate as eager. Off Hopper the Triton GEMM's tensor-core sums are not promoted.
    """
    if not fp32_statistics or element_size != 2:
        return "vendor"
    if backend == "torch":
        return "fp32"
    if tma and (d * element_size) % 16 == 0 and not softcap_with_smoothing:
        return "epilogue"
    return "vendor"


def check_chunk_budget(chunk_budget_bytes: int, v_local: int,
                       element_size: int = WIDEST_ELEMENT_SIZE) -> None:
    """A chunk budget must hold one row of [V_local] logits (by default in the widest dtype,
    so that a budget that passes holds a row whatever dtype the op later runs in)."""
    row_bytes = v_local * element_size
    if chunk_budget_bytes < row_bytes:
        raise ValueError(
            f"chunk_budget_bytes={chunk_budget_bytes} is smaller than one row of logits "
            f"({v_local} x {element_size} B = {row_bytes} B)")


def group_v_local(v_local: int, vocab_size: int, world: int) -> int:
    """The V_local to plan with: this rank's own without a group (world 1), else the largest
    slice of an even split, ceil(vocab_size / world), the same on every rank of the group
    (ranks can hold different slices: an uneven TP split gives 6 + 5 rows of 11)."""
    if world <= 1:
        return v_local
    return -(-vocab_size // world)


def _capped_rows(n_rows: int, v_local: int, element_size: int, budget: int) -> int:
    """The fewest chunks whose logits buffer fits `budget`, balanced (N=16384 with a 3500-row
    cap gives 5 chunks of 3328, not 4 of 3500 plus one of 2384) and rounded up to 128 rows
    where the cap allows, so the GEMMs keep full tiles."""
    check_chunk_budget(budget, v_local, element_size)
    most = budget // (v_local * element_size)
    if n_rows <= most:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // most)
    rows = -(-n_rows // n_chunks)
    rounded = -(-rows // ROW_ROUNDING) * ROW_ROUNDING
    return rounded if rounded <= most else rows


def _beside_the_buffer(n_rows, d, v_local, element_size, *, carry, want_grad, dh_fp32) -> int:
    """The forward's workspace beside the logits buffer: the fp32 carry and the fp32 dh, each
    net of the 16-bit gradient it stands for."""
    extra = FP32_BYTES - element_size
    return ((v_local * d * extra if carry else 0)
            + (n_rows * d * extra if want_grad and dh_fp32 else 0))


def _plan(n_rows, d, v_local, element_size, rows, *, want_grad, weight_grad_fp32,
          weight_is_fp32, dh_fp32) -> ChunkPlan:
    """The plan of `rows` rows per chunk, with its predicted time and workspace."""
    n_chunks = -(-n_rows // rows)
    carry = want_grad and weight_grad_fp32 and not weight_is_fp32 and n_chunks > 1
    e = element_size
    logits = n_rows * v_local * e
    seconds = n_chunks * PER_CHUNK_S
    if want_grad:
        c = FP32_BYTES if carry else e
        moved = 3 * logits
        if carry or dh_fp32:  # else the dW pass is in place by exactly 1: skipped
            moved += v_local * d * (c + e)
        if dh_fp32:
            moved += n_rows * d * (FP32_BYTES + e)
        if carry:
            moved += (n_chunks - 1) * 2 * FP32_BYTES * v_local * d
        seconds += 6 * n_rows * d * v_local / GEMM_FLOPS_PER_S.get(e, GEMM_FLOPS_PER_S[2])
    else:
        moved = 2 * logits
        seconds += 2 * n_rows * d * v_local / GEMM_FLOPS_PER_S.get(e, GEMM_FLOPS_PER_S[2])
    seconds += moved / HBM_BYTES_PER_S
    forward = min(rows, n_rows) * v_local * e + _beside_the_buffer(
        n_rows, d, v_local, e, carry=carry, want_grad=want_grad, dh_fp32=dh_fp32)
    workspace = max(forward, v_local * d * FP32_BYTES if carry else 0)
    return ChunkPlan(rows=rows, n_chunks=n_chunks, carry_fp32=carry,
                     predicted_ms=seconds * 1e3, workspace_bytes=workspace)


def plan_chunks(n_rows: int, d: int, v_local: int, element_size: int, *, want_grad: bool = True,
                weight_grad_fp32: bool = True, weight_is_fp32: bool = False,
                dh_fp32: bool = True, chunk_size: int | None = None,
                chunk_budget_bytes: int | None = None) -> ChunkPlan:
    """The chunk plan for N=n_rows tokens of width d against v_local vocabulary rows in
    element_size-byte logits (see the module docstring for the model and the rule).

    dh_fp32: dh is kept in fp32 until the backward (no grad_scale; with one, the backward's
    factor is exactly 1 and its in-place passes cost nothing). chunk_size forces the rows;
    chunk_budget_bytes (default 1 GiB) caps the logits buffer of
    the capped plan; the plan returned holds no more memory in all (its buffer may be larger).
    Under vocab parallelism pass `group_v_local(...)`, equal on every rank.
    """
    kw = dict(want_grad=want_grad, weight_grad_fp32=weight_grad_fp32,
              weight_is_fp32=weight_is_fp32, dh_fp32=dh_fp32)
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return _plan(n_rows, d, v_local, element_size, max(1, min(chunk_size, n_rows)), **kw)
    budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
    capped = _plan(n_rows, d, v_local, element_size,
                   _capped_rows(n_rows, v_local, element_size, budget), **kw)
    if capped.n_chunks <= 1:
        return capped
    # the largest buffer whose forward moment stays within the capped plan's workspace
    free = capped.workspace_bytes - _beside_the_buffer(
        n_rows, d, v_local, element_size, carry=capped.carry_fp32, want_grad=want_grad,
        dh_fp32=dh_fp32)
    for rows in (n_rows, _capped_rows(n_rows, v_local, element_size, free)):
        plan = _plan(n_rows, d, v_local, element_size, rows, **kw)
        if (plan.workspace_bytes <= capped.workspace_bytes
                and plan.predicted_ms <= capped.predicted_ms):
            return plan
    return capped
