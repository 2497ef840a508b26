"""An independent fp64 reference for the fused loss: materialize the logits, use torch's CE."""

import torch
import torch.nn.functional as F


def reference_loss(hidden, weight, labels, *, ignore_index=-100, reduction="sum",
                   label_smoothing=0.0, z_loss=0.0, logit_softcap=None, upstream=None):
    """Loss and (dh, dW) in float64. `upstream` weights per-token losses for reduction='none'."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = h.reshape(-1, h.shape[-1]) @ w.t()
    if logit_softcap:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    y = labels.reshape(-1)
    per_token = F.cross_entropy(z, y, reduction="none", ignore_index=ignore_index,
                                label_smoothing=label_smoothing)
    valid = y != ignore_index
    per_token = per_token + z_loss * torch.logsumexp(z, dim=1) ** 2 * valid
    if reduction == "sum":
        loss = per_token.sum()
    elif reduction == "mean":
        loss = per_token.sum() / valid.sum().clamp(min=1)
    else:
        loss = per_token.reshape(labels.shape)
    out = (loss * upstream.double()).sum() if upstream is not None else loss.sum()
    out.backward()
    return loss.detach(), h.grad, w.grad


def rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    denom = want.norm()
    return float((got - want).norm() / denom) if denom > 0 else float((got - want).norm())
