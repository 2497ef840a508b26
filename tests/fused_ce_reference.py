"""The tests' helpers beside the fp64 reference of the loss (benchmarks.reference): the token
statistics in fp64, the predicted-token check, fp32 ulps, capped logits."""

import math

import torch


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
