"""The chunked algorithm, shared by both backends (they differ in the logits path: plan.logits_path).

For each chunk of C tokens (C and the dW carry from the chunk plan, plan.py):
  1. the chunk's logits z = h_c @ W^T (+ b) by the path's GEMM, into ONE reused [C, V_local]
                                    buffer in the inputs' dtype ("epilogue": E and the tiles'
                                    partial statistics from the fp32 accumulator, these in
                                    gradient storage not yet written: _unwritten; "fp32": the
                                    fp32 product beside it; "vendor": the logits themselves)
  2. row statistics                 (max, sum-exp, target logit, logit sum), fp32; with
                                    token_stats also the entropy's numerator and the argmax
  3. vocab parallel: one all-gather of the [C, 4] statistics -> full log-sum-exp
                                    ([C, 6] with token_stats: the same one all-gather)
  4. buffer := s * dloss/dz         no second [C, V] buffer on the Triton paths; s: the
                                    announced upstream gradient (grad_scale, else 1), over
                                    reduction "mean"'s denominator (see folded_scale)
  5. dh_c = g @ W,  dW += g^T @ h_c  (dh fp32 without grad_scale, dW carried across chunks
                                    in fp32 where the plan says so: see _input_grad and
                                    _add_weight_grad);
                                    db += sum of g's rows in fp32 with a bias
On the "epilogue" and "fp32" paths the statistics and the gradient rows come from the fp32
product of the inputs, never from logits rounded to 16 bits (eager `F.cross_entropy(h @ W.T)`
rounds them first: more accurate than eager, measured in benchmarks/RESULTS.md); the
"vendor" path (fp32 inputs, or 16-bit inputs where the epilogue cannot run) reads the
logits as its GEMM wrote them.
So the [N, V] logits never exist, and the gradients are ready when the forward returns
(6NDV FLOPs). With no gradient wanted, steps 4-5 are skipped (2NDV). A dW carried in fp32 is
returned as it is: the backward's one pass scales it and rounds it to the weight's dtype;
so is an fp32 dh (see _input_grad). With grad_scale the backward's factor is the upstream
gradient over grad_scale: exactly 1 where the caller did as announced, and x * 1 is x.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import rows_torch
from .options import LossOptions
from .plan import logits_path
from .vocab_parallel import check_tiling, combine_stats, resolve_group


def rows_backend(backend: str) -> ModuleType:
    """The backend's own passes (scale_into, the backward's)."""
    if backend == "triton":
        from . import rows_triton  # imported lazily: the torch path must not need a GPU stack
        return rows_triton
    return rows_torch


def _has_tma(*tensors: torch.Tensor) -> bool:
    """TMA descriptors can load these: a CUDA GPU of compute capability >= 9 (or the Triton
    interpreter) and 16-byte aligned data."""
    from .options import triton_interpreted
    device = tensors[0].device
    capable = (triton_interpreted() if device.type != "cuda"
               else torch.cuda.get_device_capability(device)[0] >= 9)
    return capable and all(t.data_ptr() % 16 == 0 for t in tensors)


def path_of(backend: str, hidden: torch.Tensor, weight: torch.Tensor, opts: LossOptions,
            fp32_statistics: bool) -> str:
    """This call's logits path (plan.logits_path), with the tensors' own facts."""
    return logits_path(backend, hidden.element_size(), hidden.shape[-1],
                       fp32_statistics=fp32_statistics,
                       tma=backend == "triton" and _has_tma(hidden, weight),
                       softcap_with_smoothing=bool(opts.logit_softcap is not None
                                                   and opts.label_smoothing))


def path_ops(path: str, backend: str, device: torch.device):
    """(logits, rows) on `path`: the chunk's GEMM, and the module of its row passes. The
    "epilogue" GEMM is the warp-specialized Gluon kernel on Hopper (epilogue_gluon), the plain
    Triton one elsewhere (and in the interpreter); both leave epilogue_triton's format."""
    if path == "epilogue":
        from . import epilogue_gluon, epilogue_triton
        if epilogue_gluon.runs_here(device):
            return epilogue_gluon.logits, epilogue_triton
        return epilogue_triton.logits, epilogue_triton
    if path == "fp32":
        return rows_torch.logits, rows_torch
    rows = rows_backend(backend)
    return rows.vendor_chunk, rows


def loss_from_stats(stats: torch.Tensor, labels: torch.Tensor, opts: LossOptions):
    """Per-token loss and log-sum-exp from the merged statistics (0 where ignored)."""
    row_max, sum_exp, target, logit_sum = stats[:, :4].unbind(dim=1)
    lse = row_max + torch.log(sum_exp)
    loss = lse - (1.0 - opts.label_smoothing) * target + opts.z_loss * lse * lse
    if opts.label_smoothing:
        loss = loss - (opts.label_smoothing / opts.vocab_size) * logit_sum
    valid = labels != opts.ignore_index
    return torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0)


def token_outputs(stats: torch.Tensor, labels: torch.Tensor, opts: LossOptions):
    """Per-token softmax entropy (0 where ignored) and predicted token (the argmax over the
    whole vocabulary, first of ties, for every row) from the merged [C, 6] statistics.

    With S = sum e^(y-m) and T = sum e^(y-m) (y-m) (<= 0): entropy = lse - sum p y
    = log S - T / S, a sum of two terms >= 0 (no cancellation of lse against E[y])."""
    sum_exp, spread = stats[:, 1], stats[:, 4]
    entropy = torch.log(sum_exp) - spread / sum_exp
    predicted = stats[:, 5].view(torch.int32).to(torch.int64)
    return torch.where(labels != opts.ignore_index, entropy, 0.0), predicted


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Labels outside [0, vocab_size) that are not ignore_index: a ValueError, never garbage.

    Costs one host sync when the labels live on an accelerator; callers that checked the
    labels on the host already pass check_labels=False.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    count = int(bad.sum())
    if count:
        example = int(labels[bad][0])
        raise ValueError(
            f"labels: {count} value(s) outside [0, {vocab_size}) that are not "
            f"ignore_index={ignore_index}, e.g. {example}")


def mean_denominator(labels: torch.Tensor, row_weight: torch.Tensor | None,
                     ignore_index: int) -> torch.Tensor:
    """reduction "mean"'s denominator, 0-d fp32: the valid tokens, or with per-class weights
    the summed weights of the valid tokens (torch's); 1 where that is 0, so a batch of ignored
    tokens has loss 0, not torch's nan."""
    if row_weight is None:
        return (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
    total = row_weight.sum()
    return torch.where(total == 0, 1.0, total)


def folded_scale(grad_scale: torch.Tensor | None,
                 denom: torch.Tensor | None) -> torch.Tensor | None:
    """The factor folded into the gradient rows: the announced upstream gradient (None: not
    announced, 1) over "mean"'s denominator where there is one; None where neither. The op's
    backward divides by the same expression of the same tensors, so an upstream gradient as
    announced gives a factor of exactly 1."""
    if denom is None:
        return grad_scale
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=denom.device)
    return grad_scale / denom


def weight_grad_dtype(weight_dtype: torch.dtype, carry_fp32: bool) -> torch.dtype:
    """The dtype of the dW run() returns (and the op's fake says): fp32 with the plan's fp32
    carry, else the weight's."""
    return torch.float32 if carry_fp32 else weight_dtype


def dh_dtype(hidden_dtype: torch.dtype, grad_scaled: bool) -> torch.dtype:
    """The dtype of the dh run() returns (and the op's fake says): the inputs' where the
    upstream gradient is folded into the row pass (grad_scale or "mean"), else fp32 (see
    _input_grad)."""
    return hidden_dtype if grad_scaled else torch.float32


def _input_grad(z, weight, out) -> None:
    """out := z @ W, rounded once to out's dtype. Without grad_scale, out is fp32 and the
    backward's scale pass rounds it (a 16-bit dh would be rounded there a second time:
    measured at the 8B head, "mean": 2.39e-3 against fp64, 1.43x its "sum" error; N*D*2 bytes
    more until the backward); with grad_scale in z already, dh is final here."""
    if z.dtype == out.dtype:
        torch.mm(z, weight, out=out)
    elif z.device.type == "cuda":
        torch.mm(z, weight, out_dtype=torch.float32, out=out)
    else:  # no out_dtype GEMMs on CPU: the exact upcast, then an fp32 GEMM
        torch.mm(z.float(), weight.float(), out=out)


def _add_weight_grad(dw, acc, z, h_c, first: bool) -> None:
    """dW (+)= z^T @ h_c. Every GEMM accumulates in fp32 inside; across chunks, a 16-bit dW
    would be rounded once per chunk (bf16: ~1e-3 relative each time, measured 1.6e-3 -> 2.4e-3
    total dW error at 2 -> 5 chunks against eager's 1.4e-3), so with `acc` the running sum
    is carried in fp32 (cuBLAS beta=1 into an fp32 C) and rounded once, by the backward's
    scale pass, as eager rounds its single GEMM. Without `acc`: beta=1 straight into dW
    (faster, V*D*2 B leaner)."""
    if acc is None:
        if first:
            torch.mm(z.t(), h_c, out=dw)
        else:
            dw.addmm_(z.t(), h_c)
    elif acc.device.type == "cuda":
        torch.addmm(acc, z.t(), h_c, beta=0 if first else 1, out_dtype=torch.float32, out=acc)
    else:  # no out_dtype GEMMs on CPU
        acc.addmm_(z.t().float(), h_c.float(), beta=0 if first else 1)


def _unwritten(dh: torch.Tensor, dw: torch.Tensor, first: int,
               want_grad: bool) -> torch.Tensor | None:
    """Bytes of the gradients that nothing reads or writes until after the row passes of the
    chunk starting at row `first` (None without gradients): all of dW (or its fp32 carry)
    before the first chunk's weight GEMM, which overwrites it (mm, addmm with beta 0: the old
    contents are never read); dh's rows from the chunk on after that. A chunk path may keep
    its side buffers there (epilogue_triton.side_buffers): at one chunk they then add no
    memory above the logits buffer."""
    if not want_grad:
        return None
    return (dw if first == 0 else dh[first:]).reshape(-1).view(torch.uint8)


def run(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, opts: LossOptions, *,
        backend: str, chunk: int, group_name: str, want_grad: bool,
        carry_fp32: bool = False, token_stats: bool = False,
        bias: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
        lse_in: torch.Tensor | None = None, grad_rows: torch.Tensor | None = None,
        grad_scale: torch.Tensor | None = None, mean: bool = False,
        fp32_statistics: bool = False):
    """hidden [N, D], weight [V_local, D], labels [N] -> (loss [N], lse [N], dh, dW, db,
    entropy, predicted, denom).

    bias [V_local] (this rank's slice): the logits are h @ W^T + b, added in the chunk GEMM
    (addmm: rounded once, as F.linear's); db [V_local] is the gradient rows summed over the
    tokens in fp32 (empty without bias or gradient). Both backends: the row passes see the
    biased logits.
    row_weight [N] fp32 (per-class weights looked up at the labels): each token's loss and
    gradient row scaled by it; such runs take the statistics pass and the gradient pass
    apart (the row scale goes to the gradient pass), on both backends.

    entropy [N] fp32 and predicted [N] int64 (see token_outputs) with token_stats, else empty:
    off, the statistics and the collective are exactly those without them.

    chunk (rows per chunk) and carry_fp32 come from the chunk plan (plan.plan_chunks, the same
    on every rank of a group). dW is fp32 with carry_fp32 (of a 16-bit weight), else in the
    weight's dtype. grad_scale (0-d fp32: the upstream gradient the caller announced) scales
    the gradient rows in the row pass, as eager's backward does, so the GEMMs round dh and a
    16-bit dW once (one chunk, no carry), and dh comes out in the inputs' dtype; without it,
    dh is fp32 and the backward's scale pass rounds it (see _input_grad). mean: the gradient
    rows also carry 1 / mean_denominator (as eager's backward of a mean), and denom (0-d fp32)
    is returned for the caller's division of the loss sum; else denom is empty.
    The first chunk's GEMM is launched before everything else but the gradients' allocation
    (its side buffers may live in them: _unwritten): the outputs, the denominator, the
    scale, whose host time (~0.3-0.5 ms on an H200's host, where a small kernel's launch
    takes ~50 us) then runs behind that GEMM instead of in front of it, where a call that
    starts from an idle device would wait for it.
    fp32_statistics: the statistics and gradient rows from the fp32 product of 16-bit inputs
    (the "epilogue" and "fp32" paths of plan.logits_path), not from their 16-bit logits.
    With lse_in and grad_rows (the backward of reduction="none"): recompute z, skip the
    statistics and the collective, and return only (dh, dW, db) scaled per row by grad_rows.
    """
    chunk_logits, rows = path_ops(path_of(backend, hidden, weight, opts, fp32_statistics),
                                  backend, hidden.device)
    group = resolve_group(group_name) if group_name else None
    if group is not None:
        check_tiling(group_name, opts.vocab_start, weight.shape[0], opts.vocab_size)
    n_tokens = hidden.shape[0]
    recompute = lse_in is not None
    buf = torch.empty(min(chunk, n_tokens), weight.shape[0], dtype=hidden.dtype,
                      device=hidden.device)
    acc = None
    if want_grad:  # the gradients first: the chunks' side buffers may live in them
        dense = torch.contiguous_format  # the backward's scale pass walks them flat
        # the recompute's dh is final (the per-row upstream gradients are in z already)
        dh = torch.empty_like(hidden, memory_format=dense, dtype=hidden.dtype if recompute
                              else dh_dtype(hidden.dtype, grad_scale is not None or mean))
        if weight_grad_dtype(weight.dtype, carry_fp32) != weight.dtype:  # the fp32 carry
            acc = dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        elif n_tokens == 0:
            dw = torch.zeros_like(weight, memory_format=dense)
        else:
            dw = torch.empty_like(weight, memory_format=dense)
    else:
        dh, dw = hidden.new_empty(0), weight.new_empty(0)
    if n_tokens:  # the first chunk's GEMM before the rest (see the docstring)
        logits = chunk_logits(hidden[:chunk], weight, bias, labels[:chunk], buf[:chunk], opts,
                              token_stats, _unwritten(dh, dw, 0, want_grad))
    if not recompute:
        loss = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss)
        entropy = torch.empty(n_tokens if token_stats else 0, dtype=torch.float32,
                              device=hidden.device)
        predicted = torch.empty(n_tokens if token_stats else 0, dtype=torch.int64,
                                device=hidden.device)
    db = torch.zeros(weight.shape[0] if (want_grad and bias is not None) else 0,
                     dtype=torch.float32, device=weight.device)
    denom = mean_denominator(labels, row_weight, opts.ignore_index) if mean else None
    scale = folded_scale(grad_scale, denom)
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    for first in range(0, n_tokens, chunk):
        last = min(first + chunk, n_tokens)
        h_c, y_c = hidden[first:last], labels[first:last]
        z = buf[: last - first]
        if first:  # the first chunk's was launched above
            logits = chunk_logits(h_c, weight, bias, y_c, z, opts, token_stats,
                                  _unwritten(dh, dw, first, want_grad))
        if recompute:
            rows.row_grad_(logits, lse_in[first:last], y_c, grad_rows[first:last], opts)
        elif (want_grad and group is None and row_weight is None
              and hasattr(rows, "row_stats_and_grad_")):
            stats = rows.row_stats_and_grad_(logits, y_c, scale, opts, token_stats=token_stats)
            loss[first:last], lse[first:last] = loss_from_stats(stats, y_c, opts)
        else:
            stats = rows.row_stats(logits, y_c, opts, token_stats=token_stats)
            if group is not None:
                stats = combine_stats(stats, group)
            loss[first:last], lse[first:last] = loss_from_stats(stats, y_c, opts)
            if row_weight is not None:
                loss[first:last] *= row_weight[first:last]
            if want_grad:
                full_lse = stats[:, 0] + torch.log(stats[:, 1])
                row_scale = (scale.expand(last - first) if row_weight is None
                             else row_weight[first:last] * scale)
                rows.row_grad_(logits, full_lse, y_c, row_scale, opts)
        if token_stats and not recompute:
            entropy[first:last], predicted[first:last] = token_outputs(stats, y_c, opts)
        if want_grad:
            if recompute:
                torch.mm(z, weight, out=dh[first:last])
            else:
                _input_grad(z, weight, dh[first:last])
            _add_weight_grad(dw, acc, z, h_c, first == 0)
            if bias is not None:
                db.add_(z.sum(dim=0, dtype=torch.float32))
    if recompute:
        return dh, dw, db
    return loss, lse, dh, dw, db, entropy, predicted, loss.new_empty(0) if denom is None else denom
