"""A chunk's logits and the per-row passes over them, in torch ops: the CPU path and the oracle
(the "fp32" path of plan.logits_path).

`logits` takes the fp32 product of the inputs (16-bit inputs are multiplied exactly and
summed in fp32, as the Triton backend's GEMM epilogue sees them), so the statistics of
`row_stats` never come from logits rounded to 16 bits; `row_grad_` writes the gradient rows,
rounded once, into the chunk's buffer in the inputs' dtype, which the dh / dW GEMMs read.
`scale_into` is the backward's last pass: the saved gradients times the upstream scalar.
`vendor_chunk` is the "vendor" path instead: the GEMM's logits in the buffer's own dtype,
read as they are (16-bit inputs: rounded before the statistics, as eager's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .options import LossOptions


class Logits(NamedTuple):
    """One chunk on this path: z [C, V_local], the fp32 logits (the statistics' source), and
    out, the buffer the gradient rows go to (z itself for fp32 inputs)."""

    z: torch.Tensor
    out: torch.Tensor


def vendor_logits(h_c, weight, bias, out) -> None:
    """out := h_c @ W^T (+ b) in out's dtype (addmm with a bias: rounded once, as F.linear)."""
    if bias is None:
        torch.mm(h_c, weight.t(), out=out)
    else:
        torch.addmm(bias, h_c, weight.t(), out=out)


def vendor_chunk(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 labels: torch.Tensor, out: torch.Tensor, opts: LossOptions,
                 token_stats: bool = False, scratch: torch.Tensor | None = None) -> Logits:
    """The chunk's logits by the vendor GEMM into `out`, in its dtype (the "vendor" path;
    no side buffers, so no use for `scratch`)."""
    vendor_logits(h_c, weight, bias, out)
    return Logits(out, out)


def logits(h_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           labels: torch.Tensor, out: torch.Tensor, opts: LossOptions,
           token_stats: bool = False, scratch: torch.Tensor | None = None) -> Logits:
    """The chunk's logits in fp32 (the bias added in fp32); `out` receives the gradient. The
    fp32 product is a new [C, V_local] tensor (this path is the CPU oracle: `scratch`, far
    smaller, is not used)."""
    if out.dtype == torch.float32:
        vendor_logits(h_c, weight, bias, out)
        return Logits(out, out)
    # autocast off: the backward of reduction "none" recomputes this under the caller's
    # autocast, which would round an fp32 GEMM's inputs to 16 bits
    with torch.autocast(h_c.device.type, enabled=False):
        if h_c.device.type == "cuda":
            z = torch.mm(h_c, weight.t(), out_dtype=torch.float32)
        else:  # no out_dtype GEMMs on CPU: the exact upcast, then an fp32 GEMM
            z = h_c.float() @ weight.float().t()
    if bias is not None:
        z += bias.float()
    return Logits(z, out)


def _capped(z: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    y = z.float()
    if opts.logit_softcap is not None:
        y = opts.logit_softcap * torch.tanh(y / opts.logit_softcap)
    return y


def _local_targets(labels: torch.Tensor, v_local: int, opts: LossOptions):
    local = labels - opts.vocab_start
    here = (local >= 0) & (local < v_local)
    return local.clamp(0, max(v_local - 1, 0)), here


def row_stats(chunk: Logits, labels: torch.Tensor, opts: LossOptions,
              token_stats: bool = False) -> torch.Tensor:
    """[C, 4] fp32: row max, sum(exp(y - max)), target logit (0 off this slice), sum of logits.

    With token_stats, [C, 6]: two more columns, sum(exp(y - max) * (y - max)) (the entropy's
    numerator) and the row's argmax as a global vocabulary index (first of ties), stored as
    int32 bits in the fp32 column (`token_argmax` reads it back; exact at any vocabulary)."""
    z = chunk.z
    y = _capped(z, opts)
    row_max = y.amax(dim=1)
    if token_stats:
        shifted = y - row_max[:, None]
        e = torch.exp(shifted)
        sum_exp = e.sum(dim=1)
        # exp(-inf) * -inf would be nan: a logit of -inf adds 0, as it does to sum_exp
        spread = (torch.where(e > 0, shifted, 0.0) * e).sum(dim=1)
    else:
        sum_exp = torch.exp(y - row_max[:, None]).sum(dim=1)
    local, here = _local_targets(labels, z.shape[1], opts)
    target = torch.where(here, y.gather(1, local[:, None]).squeeze(1), 0.0)
    logit_sum = y.sum(dim=1) if opts.label_smoothing else torch.zeros_like(row_max)
    if not token_stats:
        return torch.stack([row_max, sum_exp, target, logit_sum], dim=1)
    argmax = (y.argmax(dim=1) + opts.vocab_start).to(torch.int32).view(torch.float32)
    return torch.stack([row_max, sum_exp, target, logit_sum, spread, argmax], dim=1)


def row_grad_(chunk: Logits, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
              opts: LossOptions) -> None:
    """chunk.out := row_scale * dloss/dz for each row (zeros where the label is ignored),
    computed in fp32 from the fp32 logits and rounded once."""
    z = chunk.z
    y = _capped(z, opts)
    g = torch.exp(y - lse[:, None]) * (1.0 + 2.0 * opts.z_loss * lse)[:, None]
    if opts.label_smoothing:
        g -= opts.label_smoothing / opts.vocab_size
    local, here = _local_targets(labels, z.shape[1], opts)
    g.scatter_add_(1, local[:, None],
                   torch.where(here, opts.label_smoothing - 1.0, 0.0)[:, None].to(g.dtype))
    if opts.logit_softcap is not None:
        # d(cap*tanh(z/cap))/dz = sech^2(z/cap): 1 - tanh^2 would cancel as tanh nears 1
        g *= torch.cosh(z.float() / opts.logit_softcap).square().reciprocal()
    g *= row_scale[:, None]
    g = torch.where((labels != opts.ignore_index)[:, None], g, 0.0)
    chunk.out.copy_(g)


def scale_into(src: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out := src * scale (a device scalar), computed in fp32 and rounded once to out's dtype.
    out may be src itself."""
    torch.mul(src, scale.float(), out=out)
