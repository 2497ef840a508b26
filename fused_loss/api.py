"""Public API: argument checks with clear errors, reductions, and the nn.Module."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .op import sum_with_grad  # (importing op registers the custom ops)
from .options import REDUCTIONS, LossOptions, pick_backend
from .plan import group_v_local, plan_chunks

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedCEAux(NamedTuple):
    """Statistics the kernel has anyway (detached): for logging logit drift and z-loss.

    With token_stats=True also, per token and from the same pass over the logits (the
    capped logits with logit_softcap), the softmax entropy, the predicted token (the argmax
    over the whole vocabulary, first of ties, as torch.argmax) and whether it is the label;
    None without token_stats."""

    lse: Tensor  # fp32, shaped like labels, 0 where ignored
    z_loss: Tensor  # the z-loss term, reduced like the loss
    valid_tokens: Tensor  # int64 device scalar: labels != ignore_index
    entropy: Tensor | None = None  # fp32, shaped like labels, 0 where ignored
    predicted: Tensor | None = None  # int64, shaped like labels, every token (ignored too)
    correct: Tensor | None = None  # bool, shaped like labels: predicted == label, False
    #                                  where ignored


def _check_tensors(hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if type(t) is not Tensor and not isinstance(t, nn.Parameter):
            raise ValueError(f"{name} must be a plain tensor, got {type(t).__name__} (for a "
                             "DTensor pass .to_local() and its vocab_start/process_group)")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V_local, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., D] has D={hidden.shape[-1] if hidden.dim() else None} "
                         f"but weight is [V_local, D] with D={weight.shape[1]}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.shape[0] < 1:
        raise ValueError("weight has no vocabulary rows (V_local = 0)")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and labels "
                         f"({labels.device}) must be on one device")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): never on there
        return False


def _follow_autocast(hidden, weight, bias=None):
    """(hidden, weight, bias, context): the three in autocast's dtype where autocast is on for
    their device, as F.linear would take them, and a context that turns autocast off around
    the op (its GEMMs write into buffers of that dtype); else as they are, and a null
    context."""
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor)
            and _autocast_enabled(hidden.device.type)):
        # _check_tensors names bad arguments
        return hidden, weight, bias, contextlib.nullcontext()
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type)
    hidden, weight, bias = (t.to(dtype) if isinstance(t, Tensor) and t.dtype in _FLOAT_DTYPES
                            else t for t in (hidden, weight, bias))
    return hidden, weight, bias, torch.autocast(device_type, enabled=False)


def _check_bias(bias, weight: Tensor) -> None:
    if not isinstance(bias, Tensor):
        raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if type(bias) is not Tensor and not isinstance(bias, nn.Parameter):
        raise ValueError(f"bias must be a plain tensor, got {type(bias).__name__} (for a "
                         "DTensor pass .to_local(): this rank's slice, like the weight)")
    if bias.dtype != weight.dtype:
        raise ValueError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V_local] = [{weight.shape[0]}] (this rank's slice, "
                         f"like the weight), got shape {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"bias ({bias.device}) and weight ({weight.device}) must be on one "
                         "device")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    chunk_budget_bytes: int | None = None,
    check_labels: bool = True,
    weight_grad_fp32: bool = True,
    return_aux: bool = False,
    token_stats: bool = False,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    shift: bool = False,
    grad_scale: Tensor | float | None = None,
    fp32_statistics: bool = False,
):
    """cross_entropy(hidden @ weight.T, labels) without ever holding the logits.

    hidden [..., D], weight [V_local, D] (this rank's rows vocab_start.. of a vocabulary of
    vocab_size, split over process_group), labels [...] int64. Returns the loss (every rank
    the same), or (loss, FusedCEAux) with return_aux. The gradient of hidden is this rank's
    partial sum over process_group: the caller reduces it (all-reduce / reduce-scatter).

    Where it differs from `F.cross_entropy(F.linear(hidden, weight), labels)`:
      - reduction defaults to "sum", not torch's "mean" (a trainer that divides by the
        global token count wants the sum); "mean" and "none" are there too.
      - every label ignored: "mean" gives 0 (and zero gradients), where torch gives nan.
      - the loss is fp32 whatever the inputs' dtype (torch returns the logits' dtype).
    As in eager, with 16-bit inputs the logits are 16-bit and the fp32 row statistics
    (log-sum-exp, ...) are those of the rounded logits. Under `torch.autocast` it follows
    autocast as F.linear does: hidden and weight are cast to autocast's dtype for the
    device (their gradients come back in their own dtypes) and the op runs in that dtype.

    z_loss adds z_loss * logsumexp**2 per token; logit_softcap applies cap*tanh(z/cap)
    (None = off). weight_grad_fp32 carries the weight gradient across token chunks in fp32
    (V_local*D*2 bytes more than dW itself, until the backward rounds it; off: 16-bit carry,
    faster but rounded once per chunk).

    The chunks are planned per call (`plan_chunks`): the fewest whose [rows, V_local] logits
    buffer fits chunk_budget_bytes (the cap, default 1 GiB), or fewer, larger chunks (one
    without the fp32 carry) where they cost no more memory in all and no more time;
    chunk_size forces the rows.

    bias [V_local] (this rank's slice under vocab parallelism, like the weight): logits
    hidden @ weight.T + bias, as F.linear's; its gradient is summed over the tokens in fp32
    and rounded once to bias's dtype.

    class_weight [vocab_size] (the whole vocabulary on every rank; F.cross_entropy's
    `weight`): each token's loss (z-loss included) and gradient are scaled by the weight of
    its label, and "mean" divides by the summed weights of the valid tokens (the loss is 0
    where that sum is 0). It gets no gradient. Not with label_smoothing (torch weights the
    smoothing term per class).

    shift (causal, as CCE's): hidden [..., T, D] and labels [..., T] of the same positions;
    the label of position t+1 is scored at t (the last position scores nothing), without
    copying the hidden states (only the labels are shifted). Per-token outputs ("none",
    FusedCEAux) are then [..., T-1].

    grad_scale: the gradient the returned loss will get in backward, where the caller knows it
    before the forward (torchtitan's trainer backpropagates loss / global_tokens: grad_scale =
    1 / global_tokens, computed as autograd will, `torch.ones(()) / global_tokens`); a float or
    a one-element tensor (no host sync). It is folded into the gradient rows, as eager's
    backward folds it, so dh and a 16-bit dW of one chunk are rounded once and dh needs no fp32
    buffer (N*D*2 bytes leaner); without it a one-chunk dW is rounded again by the backward's
    scale whenever the upstream gradient is not 1. A different real gradient is still applied
    exactly (the backward multiplies by real / announced), with that one more rounding.
    "mean" announces 1 / (its denominator) itself (times grad_scale, if given).

    fp32_statistics: with 16-bit inputs, the row statistics (log-sum-exp, target logit, ...)
    and the gradient rows come from the fp32 product of the inputs, never from logits rounded
    to 16 bits (eager rounds them first): on LM-like inputs the loss error is 0.05-0.85x and
    the dh, dW errors ~0.2x eager's (benchmarks/RESULTS.md). The Triton backend takes them from its own
    GEMM's fp32 accumulator (plan.logits_path "epilogue": a GPU of compute capability >= 9, D a
    multiple of 8, not softcap with label smoothing; elsewhere the 16-bit logits as without
    it; on an H200 0.97-1.01x the default path's time, at its memory); the torch backend
    multiplies in fp32.

    token_stats (needs return_aux) fills FusedCEAux's entropy, predicted and correct from the
    same statistics pass (two more fp32 numbers per row, in the same all-gather under vocab
    parallelism); off, the op computes exactly what it computes without the option.
    """
    hidden, weight, bias, autocast_off = _follow_autocast(hidden, weight, bias)
    _check_tensors(hidden, weight, labels)
    if bias is not None:
        _check_bias(bias, weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(token_stats, bool):
        raise ValueError(f"token_stats must be True or False, got {token_stats!r}")
    if not isinstance(fp32_statistics, bool):
        raise ValueError(f"fp32_statistics must be True or False, got {fp32_statistics!r}")
    if token_stats and not return_aux:
        raise ValueError("token_stats=True needs return_aux=True (the per-token outputs are "
                         "FusedCEAux's entropy, predicted and correct)")
    v_local = weight.shape[0]
    if vocab_size is None:
        if process_group is not None and dist.get_world_size(process_group) > 1:
            raise ValueError("vocab_size (the global vocabulary) is required with a "
                             "process_group of more than one rank")
        vocab_size = vocab_start + v_local
    if vocab_start + v_local > vocab_size:
        raise ValueError(f"weight rows [{vocab_start}, {vocab_start + v_local}) exceed "
                         f"vocab_size={vocab_size}")
    opts = LossOptions(ignore_index=ignore_index, label_smoothing=float(label_smoothing),
                       z_loss=float(z_loss), vocab_start=vocab_start, vocab_size=vocab_size,
                       logit_softcap=None if logit_softcap is None else float(logit_softcap))
    backend = pick_backend(backend, hidden.device.type)
    group_name = ""
    if process_group is not None and dist.get_world_size(process_group) > 1:
        group_name = process_group.group_name

    row_weight = None
    if class_weight is not None:
        if not isinstance(class_weight, Tensor) or class_weight.dtype not in _FLOAT_DTYPES + (
                torch.float64,):
            raise ValueError("class_weight must be a floating point torch.Tensor or None, got "
                             f"{getattr(class_weight, 'dtype', type(class_weight).__name__)}")
        if class_weight.shape != (vocab_size,):
            raise ValueError(f"class_weight must be [vocab_size] = [{vocab_size}] (the whole "
                             f"vocabulary, on every rank), got shape {tuple(class_weight.shape)}")
        if class_weight.device != hidden.device:
            raise ValueError(f"class_weight ({class_weight.device}) must be on the inputs' "
                             f"device ({hidden.device})")
        if label_smoothing:
            raise ValueError("class_weight with label_smoothing is not supported (torch weights "
                             "the smoothing term per class)")

    if grad_scale is not None and reduction == "none":
        raise ValueError("grad_scale is for reduction 'sum' or 'mean' (a scalar loss); with "
                         "'none' the per-token gradients come in the backward")
    if not isinstance(shift, bool):
        raise ValueError(f"shift must be True or False, got {shift!r}")
    if shift and labels.dim() < 1:
        raise ValueError("shift needs a sequence dimension: hidden [..., T, D], labels [..., T]")
    if shift:  # labels[..., t + 1] scored at t; the last position ignored (a copy of labels)
        shifted = torch.full_like(labels, ignore_index)
        shifted[..., :-1] = labels[..., 1:]
        labels = shifted

    def unshift(t):
        return t[..., :-1] if shift else t

    lead_shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    if h.stride(-1) != 1:  # a layout matter, not an error
        h = h.contiguous()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    if class_weight is not None:  # the label's weight per token, 0 where ignored
        row_weight = torch.where(y != ignore_index,
                                 class_weight.detach().float()[y.clamp(0, vocab_size - 1)], 0.0)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    # The upstream gradient the op's loss will get, folded into the gradient rows as eager's
    # backward folds it, so that dh and a 16-bit dW are rounded once (the backward divides the
    # real one by it: 1 where as announced). "mean" is divided inside the op, which folds in
    # (announced or 1) / its denominator (chunked.folded_scale), the very division autograd
    # does through loss / denom; the op computes that denominator after launching its first
    # GEMM, so the small kernels' host time does not delay it.
    mean = reduction == "mean"
    announced = _announced_scale(grad_scale, h.device)  # validated with or without a gradient
    op_grad_scale = announced if want_grad else None
    # One plan per call (plan.py). Under vocab parallelism every rank must run the same
    # chunks (one collective each): planned on the largest slice, the same on every rank.
    world = dist.get_world_size(process_group) if group_name else 1
    plan = plan_chunks(h.shape[0], h.shape[1], group_v_local(v_local, vocab_size, world),
                       h.element_size(), want_grad=want_grad,
                       weight_grad_fp32=weight_grad_fp32,
                       weight_is_fp32=weight.dtype == torch.float32,
                       dh_fp32=op_grad_scale is None and not mean, chunk_size=chunk_size,
                       chunk_budget_bytes=chunk_budget_bytes)
    op_args = dict(opts.to_op_args(), group_name=group_name, backend=backend, chunk=plan.rows,
                   carry_fp32=plan.carry_fp32, check_labels=check_labels,
                   token_stats=token_stats, fp32_statistics=fp32_statistics)

    if reduction == "none":
        with autocast_off:
            loss, lse, entropy, predicted = torch.ops.fused_loss.lce_rows(
                h, weight, y, bias, row_weight, **op_args)
        z_term = z_loss * lse * lse
        if row_weight is not None:
            z_term = z_term * row_weight
        loss, lse, z_term = (unshift(t.reshape(lead_shape)) for t in (loss, lse, z_term))
    else:
        with autocast_off:
            loss, lse, _, _, _, entropy, predicted, denom = sum_with_grad(
                h, weight, y, bias, row_weight, op_grad_scale, **op_args, want_grad=want_grad,
                mean=mean)
        if row_weight is None:
            z_term = z_loss * (lse * lse).sum()
        else:
            z_term = z_loss * (row_weight * lse * lse).sum()
        if mean:
            denom = denom.detach()  # a count of the labels, not a function of the inputs
            loss, z_term = loss / denom, z_term / denom
        lse = unshift(lse.reshape(lead_shape))
    if not return_aux:
        return loss
    valid = (y != ignore_index).sum()
    if not token_stats:
        return loss, FusedCEAux(lse.detach(), z_term.detach(), valid)
    correct = (predicted == y) & (y != ignore_index)
    entropy, predicted, correct = (unshift(t.reshape(lead_shape))
                                   for t in (entropy, predicted, correct))
    return loss, FusedCEAux(lse.detach(), z_term.detach(), valid, entropy.detach(), predicted,
                            correct)


def _announced_scale(grad_scale, device) -> Tensor | None:
    """grad_scale as a 0-d fp32 tensor on `device` (None: not announced)."""
    if grad_scale is None:
        return None
    if isinstance(grad_scale, Tensor):
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise ValueError("grad_scale must be a float or a one-element floating point tensor, "
                             f"got {grad_scale.dtype} of shape {tuple(grad_scale.shape)}")
        return grad_scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)):
        raise ValueError(f"grad_scale must be a float or a tensor, got {type(grad_scale).__name__}")
    if not (math.isfinite(grad_scale) and grad_scale != 0):
        raise ValueError(f"grad_scale must be finite and non-zero, got {grad_scale!r}")
    return torch.tensor(float(grad_scale), dtype=torch.float32, device=device)


class FusedLinearCrossEntropy(nn.Module):
    """An LM head that returns the loss: owns `weight` [V_local, D] like nn.Linear(D, V).

    For vocabulary parallelism give this rank's slice size as out_features with vocab_start,
    vocab_size and process_group; other keyword arguments are fused_linear_cross_entropy's.
    """

    def __init__(self, in_features: int, out_features: int, *, vocab_start: int = 0,
                 vocab_size: int | None = None, process_group=None, device=None, dtype=None,
                 **loss_options):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        self.vocab_start, self.vocab_size = vocab_start, vocab_size
        self.process_group = process_group
        self.loss_options = loss_options
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default

    def forward(self, hidden: Tensor, labels: Tensor):
        return fused_linear_cross_entropy(hidden, self.weight, labels,
                                          vocab_start=self.vocab_start,
                                          vocab_size=self.vocab_size,
                                          process_group=self.process_group,
                                          **self.loss_options)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"vocab_start={self.vocab_start}, vocab_size={self.vocab_size}")
