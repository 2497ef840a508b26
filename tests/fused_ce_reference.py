"""An independent fp64 reference for the fused loss: materialize the logits, use torch's CE."""

import math

import torch
import torch.nn.functional as F


def reference_loss(hidden, weight, labels, *, ignore_index=-100, reduction="sum",
                   label_smoothing=0.0, z_loss=0.0, logit_softcap=None, upstream=None,
                   bias=None, class_weight=None):
    """Loss and (dh, dW) in float64, and db with a bias. `upstream` weights per-token losses
    for reduction='none'."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = h.reshape(-1, h.shape[-1]) @ w.t()
    if bias is not None:
        b = bias.detach().double().requires_grad_()
        z = z + b
    if logit_softcap:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    y = labels.reshape(-1)
    cw = None if class_weight is None else class_weight.double()
    per_token = F.cross_entropy(z, y, reduction="none", ignore_index=ignore_index,
                                label_smoothing=label_smoothing, weight=cw)
    valid = y != ignore_index
    token_weight = valid.double()
    if cw is not None:  # the z-loss is weighted like the token's cross-entropy
        token_weight = torch.where(valid, cw[y.clamp(min=0)], 0.0)
    per_token = per_token + z_loss * torch.logsumexp(z, dim=1) ** 2 * token_weight
    if reduction == "sum":
        loss = per_token.sum()
    elif reduction == "mean" and cw is not None:  # torch: divided by the summed weights
        total = token_weight.sum()
        loss = per_token.sum() / (total if total != 0 else 1.0)
    elif reduction == "mean":
        loss = per_token.sum() / valid.sum().clamp(min=1)
    else:
        loss = per_token.reshape(labels.shape)
    out = (loss * upstream.double()).sum() if upstream is not None else loss.sum()
    out.backward()
    if bias is not None:
        return loss.detach(), h.grad, w.grad, b.grad
    return loss.detach(), h.grad, w.grad


def reference_token_stats(hidden, weight, labels, *, ignore_index=-100, logit_softcap=None):
    """(entropy, logits) in float64: the softmax entropy per token (0 where ignored) and the
    (capped) logits, from which a test judges the predicted token."""
    h = hidden.detach().double()
    z = h.reshape(-1, h.shape[-1]) @ weight.detach().double().t()
    if logit_softcap:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    p = torch.softmax(z, dim=1)
    entropy = -(p * torch.log_softmax(z, dim=1)).sum(dim=1)
    valid = labels.reshape(-1) != ignore_index
    return torch.where(valid, entropy, 0.0).reshape(labels.shape), z


def assert_predicted(predicted, logits, labels, correct, ignore_index=-100, slack=1e-5):
    """predicted is an argmax of the fp64 logits up to `slack` (an fp32 kernel may pick
    another of two logits closer than its rounding), and correct is predicted == label on
    the valid tokens."""
    predicted, labels, correct = (t.reshape(-1) for t in (predicted, labels, correct))
    assert predicted.dtype == torch.int64 and correct.dtype == torch.bool
    top = logits.max(dim=1).values
    picked = logits.gather(1, predicted[:, None].clamp(0, logits.shape[1] - 1)).squeeze(1)
    assert bool(((predicted >= 0) & (predicted < logits.shape[1])).all()), predicted
    assert bool((top - picked <= slack * top.abs().clamp(min=1)).all()), (top - picked).max()
    assert torch.equal(correct, (predicted == labels) & (labels != ignore_index))


def rel_err(got, want):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    denom = want.norm()
    return float((got - want).norm() / denom) if denom > 0 else float((got - want).norm())


def ulps(got, want):
    """|got - want| in units of the fp32 spacing at want (want in fp64): the worst element."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    spacing = torch.ldexp(torch.ones_like(want), torch.frexp(want.float().abs())[1] - 24)
    return float(((got - want).abs() / spacing.clamp(min=2.0 ** -149)).max())


def softcap_logits(n, v, cap, lo, hi, seed=0):
    """[n, v] fp32 logits with |z|/cap spread log-uniformly over [lo, hi], random signs."""
    g = torch.Generator().manual_seed(seed)
    u = torch.empty(n, v, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g)
    sign = torch.where(torch.rand(n, v, generator=g) < 0.5, -1.0, 1.0)
    return (u.exp() * sign * cap).float()


try:  # the Triton backend's capped logit, elementwise: a one-line kernel around its _cap
    import triton
    import triton.language as tl

    from fused_loss import rows_triton

    @triton.jit
    def _softcap_kernel(x_ptr, out_ptr, n, cap, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, rows_triton._cap(x, cap, True), mask=mask)

    def triton_softcap(z, cap):
        out = torch.empty_like(z)
        _softcap_kernel[(triton.cdiv(z.numel(), 4096),)](z, out, z.numel(), cap, BLOCK=4096)
        return out
except ImportError:  # no triton on this platform
    triton_softcap = None
