"""The per-row passes over one logits chunk, in torch ops: the CPU path and the oracle.

Both passes see `z [C, V_local]`, the logits of C tokens for this rank's vocabulary slice, in
the GEMM's dtype (16-bit inputs: 16-bit logits, read as they are, as eager reads its
logits). Statistics come out in fp32; the gradient overwrites `z` in place.
`scale_into` is the backward's last pass: the saved gradients times the upstream scalar.
"""

from __future__ import annotations

import torch

from .options import LossOptions


def _capped(z: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    y = z.float()
    if opts.logit_softcap is not None:
        y = opts.logit_softcap * torch.tanh(y / opts.logit_softcap)
    return y


def _local_targets(labels: torch.Tensor, v_local: int, opts: LossOptions):
    local = labels - opts.vocab_start
    here = (local >= 0) & (local < v_local)
    return local.clamp(0, max(v_local - 1, 0)), here


def row_stats(z: torch.Tensor, labels: torch.Tensor, opts: LossOptions,
              token_stats: bool = False) -> torch.Tensor:
    """[C, 4] fp32: row max, sum(exp(y - max)), target logit (0 off this slice), sum of logits.

    With token_stats, [C, 6]: two more columns, sum(exp(y - max) * (y - max)) (the entropy's
    numerator) and the row's argmax as a global vocabulary index (first of ties), stored as
    int32 bits in the fp32 column (`token_argmax` reads it back; exact at any vocabulary)."""
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


def row_grad_(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
              opts: LossOptions) -> None:
    """Overwrite z with row_scale * dloss/dz for each row (zeros where the label is ignored)."""
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
    z.copy_(g)


def scale_into(src: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """out := src * scale (a device scalar), computed in fp32 and rounded once to out's dtype.
    out may be src itself."""
    torch.mul(src, scale.float(), out=out)
