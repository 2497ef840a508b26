"""The custom ops: what torch.compile sees as opaque, and their autograd. Eager calls of the
sum op (`sum_with_grad`) run the same forward and backward through a plain autograd.Function.

  fused_loss::lce_sum            -> (loss sum, lse [N], dh, dW, db, entropy, predicted,
                                     denom)                       gradient in forward
  fused_loss::lce_rows           -> (loss [N], lse [N], entropy, predicted)  reduction="none"
  fused_loss::lce_rows_backward  -> (dh, dW, db)                  recompute with per-row grads

bias (optional, [V_local]) is a positional tensor input like the others; db is empty without
it (or without a gradient). row_weight (optional, [N] fp32): per-token weights (the class
weights at the labels) scaling each token's loss and gradient.

chunk (rows per chunk) and carry_fp32 (dW carried across the chunks in fp32) are the chunk
plan's (plan.plan_chunks, chosen once per call by the API), so the op and its fake agree.

The sum op computes the gradients in its forward (6NDV instead of 8NDV); its backward only
multiplies them by the scalar upstream gradient (and rounds a dW carried in fp32 to the
weight's dtype in the same pass). grad_scale (optional, 0-d fp32): the upstream gradient the
caller announced, folded into the gradients in forward; the backward multiplies by
upstream / grad_scale, exactly 1 where the announcement held. mean: the op also folds in
1 / reduction "mean"'s denominator and returns it (denom, 0-d fp32; empty without mean): the
caller divides the loss sum by it, so the sum's upstream gradient is the announced one over
denom, and the backward divides by that same expression (chunked.folded_scale). entropy [N] fp32 and predicted
[N] int64 are there with token_stats (else empty), never differentiable. Per-token upstream gradients ("none") cannot
be folded in that way, so that path recomputes the logits in backward instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import chunked
from .options import LossOptions

# Every op takes its tensors positionally and everything else as keyword-only arguments, named
# as LossOptions' fields plus the run's settings: autograd then asks a gradient for the tensors
# alone (_input_grads), and setup_context receives the options as a dict, by name.


def _input_grads(op, **grads) -> tuple:
    """The backward's return: one entry per positional (tensor) input of `op`, in its schema's
    order, the named ones from `grads`, None for the rest."""
    names = [a.name for a in op._schema.arguments if not a.kwarg_only]
    if set(grads) - set(names):
        raise TypeError(f"{op} has no tensor inputs named {sorted(set(grads) - set(names))}")
    return tuple(grads.get(name) for name in names)


def _sum(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
         row_weight: Tensor | None = None, grad_scale: Tensor | None = None, *,
            ignore_index: int,
            label_smoothing: float, z_loss: float, logit_softcap: float | None,
            vocab_start: int, vocab_size: int, group_name: str, backend: str, chunk: int,
            want_grad: bool, carry_fp32: bool, check_labels: bool,
            token_stats: bool = False, mean: bool = False, fp32_statistics: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = LossOptions.from_op_args(locals())  # first statement: locals() are the arguments
    if check_labels:
        chunked.check_label_range(labels, opts.vocab_size, opts.ignore_index)
    loss, lse, dh, dw, db, entropy, predicted, denom = chunked.run(
        hidden, weight, labels, opts, backend=backend, chunk=chunk, group_name=group_name,
        want_grad=want_grad, carry_fp32=carry_fp32, token_stats=token_stats,
        bias=bias, row_weight=row_weight, grad_scale=grad_scale, mean=mean,
        fp32_statistics=fp32_statistics)
    return loss.sum(), lse, dh, dw, db, entropy, predicted, denom


lce_sum = torch.library.custom_op("fused_loss::lce_sum", mutates_args=())(_sum)


def _fake_token_outputs(hidden, token_stats):
    n = hidden.shape[0] if token_stats else 0
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.int64))


@lce_sum.register_fake
def _(hidden, weight, labels, bias=None, row_weight=None, grad_scale=None, *, want_grad,
      carry_fp32, token_stats=False, mean=False, **_):
    n = hidden.shape[0]
    loss = hidden.new_empty((), dtype=torch.float32)
    lse = hidden.new_empty(n, dtype=torch.float32)
    tokens = _fake_token_outputs(hidden, token_stats)
    denom = hidden.new_empty(() if mean else (0,), dtype=torch.float32)
    db = hidden.new_empty(weight.shape[0] if (want_grad and bias is not None) else 0,
                          dtype=torch.float32)
    if want_grad:
        dw = torch.empty_like(weight, dtype=chunked.weight_grad_dtype(weight.dtype, carry_fp32))
        dh = torch.empty_like(hidden, dtype=chunked.dh_dtype(hidden.dtype,
                                                             grad_scale is not None or mean))
        return loss, lse, dh, dw, db, *tokens, denom
    return loss, lse, hidden.new_empty(0), hidden.new_empty(0), db, *tokens, denom


def _sum_setup_context(ctx, inputs, keyword_only_inputs, output):
    _, _, dh, dw, db, _, _, denom = output
    grad_scale = inputs[5] if len(inputs) > 5 else None
    ctx.save_for_backward(dh, dw, db, grad_scale,
                          denom if keyword_only_inputs.get("mean", False) else None)
    ctx.hidden_dtype, ctx.weight_dtype = inputs[0].dtype, inputs[1].dtype
    bias = inputs[3] if len(inputs) > 3 else None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = keyword_only_inputs["backend"]
    # The dh / dW outputs are never used downstream: left materialized, their zero
    # "gradients" would be a second dW-sized buffer (2 GiB fp32 at the 8B head) in backward.
    ctx.set_materialize_grads(False)


def _sum_backward(ctx, grad_loss, grad_lse, grad_dh, grad_dw, grad_db=None, grad_entropy=None,
                  _grad_predicted=None, grad_denom=None):
    if grad_loss is None or any(g is not None for g in (grad_lse, grad_dh, grad_dw, grad_db,
                                                        grad_entropy, grad_denom)):
        raise RuntimeError("fused_loss::lce_sum is differentiable through its loss output "
                           "only (the API returns lse and denom detached)")
    dh, dw, db, grad_scale, denom = ctx.saved_tensors
    folded = chunked.folded_scale(grad_scale, denom)
    if folded is not None:  # the gradients hold it already: 1 where as announced
        grad_loss = grad_loss / folded
    op = torch.ops.fused_loss.lce_sum.default
    has_db = ctx.bias_dtype is not None and db.numel() > 0
    if torch.compiler.is_compiling() or is_fake(dh):  # traced (AOT autograd): graph ops
        return _input_grads(op, hidden=(dh * grad_loss).to(ctx.hidden_dtype),
                            weight=(dw * grad_loss).to(ctx.weight_dtype),
                            bias=(db * grad_loss).to(ctx.bias_dtype) if has_db else None)
    rows = chunked.rows_backend(ctx.backend)
    return _input_grads(op, hidden=_scale_and_round(rows, dh, grad_loss, ctx.hidden_dtype),
                        weight=_scale_and_round(rows, dw, grad_loss, ctx.weight_dtype),
                        bias=_scale_and_round(rows, db, grad_loss, ctx.bias_dtype)
                        if has_db else None)


def _scale_and_round(rows, saved: Tensor, grad_loss: Tensor, dtype: torch.dtype) -> Tensor:
    """saved * grad_loss, rounded once to `dtype`. In place where saved has that dtype: a
    second dW-sized buffer would be the op's peak memory. Else into a new tensor, and the fp32
    buffer's memory is released right away (not when autograd drops the node), so the fp32 dh
    and dW are never held together with both of their rounded copies. The saved gradients
    are ours alone (the API drops those outputs); a second backward through the graph is
    refused by autograd's version counter ("modified by an inplace operation"), never wrong.
    """
    if saved.dtype == dtype:
        rows.scale_into(saved, grad_loss, saved)
        return saved
    out = torch.empty_like(saved, dtype=dtype)
    rows.scale_into(saved, grad_loss, out)
    torch.autograd.graph.increment_version(saved)
    saved.untyped_storage().resize_(0)
    return out


lce_sum.register_autograd(_sum_backward, setup_context=_sum_setup_context)


class _EagerSum(torch.autograd.Function):
    """lce_sum where torch.compile is not tracing: the same forward, context and backward,
    without the custom-op dispatcher and its autograd wrapper, whose host time (~0.24 ms per
    forward + backward on a CPU core, benchmarks/NOTES.md attempt 18) shows in the short calls.
    The options travel as one dict (autograd.Function takes no keyword arguments). The context
    is set in forward(ctx, ...), not in a separate setup_context: with one, every apply binds
    the arguments through inspect.signature (~50 us of host time before the first GEMM)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, row_weight, grad_scale, options):
        output = _sum(hidden, weight, labels, bias, row_weight, grad_scale, **options)
        _sum_setup_context(ctx, (hidden, weight, labels, bias, row_weight, grad_scale), options,
                           output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return *_sum_backward(ctx, *grads), None  # no gradient for the options


def sum_with_grad(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
                  row_weight: Tensor | None, grad_scale: Tensor | None, **options):
    """The sum op and its autograd: torch.compile sees fused_loss::lce_sum (one opaque node);
    eager runs the same code through _EagerSum."""
    if torch.compiler.is_compiling():
        return torch.ops.fused_loss.lce_sum(hidden, weight, labels, bias, row_weight, grad_scale,
                                            **options)
    return _EagerSum.apply(hidden, weight, labels, bias, row_weight, grad_scale, options)


@torch.library.custom_op("fused_loss::lce_rows", mutates_args=())
def lce_rows(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
             row_weight: Tensor | None = None, *,
             ignore_index: int,
             label_smoothing: float, z_loss: float, logit_softcap: float | None,
             vocab_start: int, vocab_size: int, group_name: str, backend: str, chunk: int,
             carry_fp32: bool, check_labels: bool,
             token_stats: bool = False, fp32_statistics: bool = False
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = LossOptions.from_op_args(locals())  # first statement: locals() are the arguments
    if check_labels:
        chunked.check_label_range(labels, opts.vocab_size, opts.ignore_index)
    loss, lse, _, _, _, entropy, predicted, _ = chunked.run(
        hidden, weight, labels, opts, backend=backend, chunk=chunk, group_name=group_name,
        want_grad=False, token_stats=token_stats, bias=bias, row_weight=row_weight,
        fp32_statistics=fp32_statistics)
    return loss, lse, entropy, predicted


@lce_rows.register_fake
def _(hidden, weight, labels, bias=None, row_weight=None, *, token_stats=False, **_):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            *_fake_token_outputs(hidden, token_stats))


@torch.library.custom_op("fused_loss::lce_rows_backward", mutates_args=())
def lce_rows_backward(hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
                      grad_rows: Tensor, bias: Tensor | None = None, *, ignore_index: int,
                      label_smoothing: float, z_loss: float, logit_softcap: float | None,
                      vocab_start: int, vocab_size: int, backend: str, chunk: int,
                      carry_fp32: bool, fp32_statistics: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor]:
    opts = LossOptions.from_op_args(locals())  # first statement: locals() are the arguments
    dh, dw, db = chunked.run(hidden, weight, labels, opts, backend=backend, chunk=chunk,
                             group_name="", want_grad=True, carry_fp32=carry_fp32,
                             bias=bias, lse_in=lse, grad_rows=grad_rows.float().contiguous(),
                             fp32_statistics=fp32_statistics)
    return dh, dw.to(weight.dtype), db if bias is None else db.to(bias.dtype)


@lce_rows_backward.register_fake
def _(hidden, weight, labels, lse, grad_rows, bias=None, **kwargs):
    db = (hidden.new_empty(0, dtype=torch.float32) if bias is None
          else torch.empty_like(bias))
    return torch.empty_like(hidden), torch.empty_like(weight), db


# lce_rows' arguments the recompute does not take: it runs no collective (the saved lse is
# already the full-vocabulary one), the labels were checked in forward and the per-token
# outputs were given there
_NOT_RECOMPUTED = ("group_name", "check_labels", "token_stats")


def _rows_setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, labels, *optional = inputs
    bias, row_weight = (list(optional) + [None, None])[:2]
    ctx.save_for_backward(hidden, weight, labels, output[1], bias, row_weight)
    ctx.options = {k: v for k, v in keyword_only_inputs.items() if k not in _NOT_RECOMPUTED}


def _rows_backward(ctx, grad_loss, _grad_lse, _grad_entropy=None, _grad_predicted=None):
    hidden, weight, labels, lse, bias, row_weight = ctx.saved_tensors
    if row_weight is not None:  # the per-token weights scale the upstream gradient
        grad_loss = grad_loss * row_weight
    dh, dw, db = lce_rows_backward(hidden, weight, labels, lse, grad_loss, bias, **ctx.options)
    return _input_grads(torch.ops.fused_loss.lce_rows.default, hidden=dh, weight=dw,
                        bias=None if bias is None else db)


lce_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)
