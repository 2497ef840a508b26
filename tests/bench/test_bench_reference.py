"""The kernel benchmark's fp64 reference against an independent fp64 computation of CE, and
its LM-like inputs (a peaked softmax) against their aimed range (benchmarks/kernel/common.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernel import common as kc
from benchmarks.reference import rel_err


def _autograd_fp64(inp, reduction):
    h = inp.h.detach().double().requires_grad_(True)
    W = inp.W.detach().double().requires_grad_(True)
    loss = F.cross_entropy(h @ W.T, inp.y, reduction=reduction, ignore_index=kc.IGNORE)
    loss.backward()
    return loss.detach(), h.grad, W.grad


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["random", "lm"])
def test_fp64_reference_matches_autograd(reduction, kind):
    inp = kc.make_inputs(37, 24, 301, torch.bfloat16, "cpu", seed=3, kind=kind)
    assert (inp.y == kc.IGNORE).any() and (inp.y != kc.IGNORE).any()
    ref = kc.fp64_reference(inp, chunk=8, reduction=reduction)  # several chunks, a ragged last one
    loss, dh, dW = _autograd_fp64(inp, reduction)
    assert ref.loss.dtype == ref.dh.dtype == ref.dW.dtype == torch.float64
    torch.testing.assert_close(ref.loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref.dh, dh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ref.dW, dW, rtol=1e-10, atol=1e-14)
    # the softmax statistics of the notes, independently
    valid = inp.y != kc.IGNORE
    logp = torch.log_softmax(inp.h.detach().double() @ inp.W.detach().double().T, 1)[valid]
    p_t = logp.gather(1, inp.y[valid][:, None]).exp().mean()
    ent = -(logp.exp() * logp).sum(1).mean()
    assert ref.target_prob == pytest.approx(float(p_t), rel=1e-10)
    assert ref.entropy == pytest.approx(float(ent), rel=1e-10)


def test_fp64_reference_is_more_exact_than_fp32():
    """The reference is fp64: an fp32 computation of the same CE is measurably off from it."""
    inp = kc.make_inputs(64, 128, 4000, torch.bfloat16, "cpu", seed=1, kind="lm")
    ref = kc.fp64_reference(inp, reduction="sum")
    h = inp.h.detach().float().requires_grad_(True)
    W = inp.W.detach().float()
    F.cross_entropy(h @ W.T, inp.y, reduction="sum", ignore_index=kc.IGNORE).backward()
    err32 = rel_err(h.grad, ref.dh)
    assert 1e-9 < err32 < 1e-4


def test_lm_inputs_are_peaked():
    lo, hi = kc.LM_TARGET_PROB
    lm = kc.make_inputs(256, 256, 2000, torch.bfloat16, "cpu", seed=0, kind="lm")
    rnd = kc.make_inputs(256, 256, 2000, torch.bfloat16, "cpu", seed=0, kind="random")
    ref_lm, ref_rnd = kc.fp64_reference(lm), kc.fp64_reference(rnd)
    assert lo <= ref_lm.target_prob <= hi, ref_lm.describe()
    assert 1.5 < ref_lm.entropy < 4.0, ref_lm.describe()
    assert ref_rnd.target_prob < 0.01 and ref_rnd.entropy > 7.0, ref_rnd.describe()
    # the same weights and labels, only h differs (its std ~1/(0.02 sqrt(D)): 4.7 here, 0.85 at D=4096)
    assert torch.equal(lm.W, rnd.W) and torch.equal(lm.y, rnd.y)
    assert 1.0 < lm.h.float().std().item() < 8.0
    # most valid rows predict their label, as a trained LM's do on easy tokens
    valid = lm.y != kc.IGNORE
    pred = (lm.h.detach().float() @ lm.W.detach().float().T).argmax(1)
    assert 0.5 < (pred == lm.y)[valid].float().mean().item() < 0.95
    with pytest.raises(ValueError, match="input kind"):
        kc.make_inputs(4, 4, 10, torch.bfloat16, "cpu", kind="zipf")


@pytest.mark.parametrize("name, budget_mib, expected", [
    ("fused", None, None), ("fused", 2048, 2048 << 20),
    ("fused_lean", 2048, 512 << 20),  # the lean setting keeps its own cap
])
def test_chunk_budget_reaches_the_fused_op(monkeypatch, name, budget_mib, expected):
    import argparse

    from benchmarks.kernel import impls as kernel_impls
    seen = {}
    monkeypatch.setattr(kernel_impls, "_fused_entry",
                        lambda: lambda h, W, y, **kw: seen.update(kw))
    args = argparse.Namespace(backend="torch", reduction="mean", chunk_size=None,
                              chunk_budget_mib=budget_mib)
    kernel_impls.build_impl(name, args, kc.Dev(torch.device("cpu")))(None, None, None)
    assert seen.get("chunk_budget_bytes") == expected


def test_device_names_share_one_cpu_name():
    """A CPU device's name in a kernel block is the machine's CPU, as in any block's header."""
    from benchmarks import bench_common

    assert kc.Dev(torch.device("cpu")).name() == bench_common.cpu_name()
    if not torch.cuda.is_available():
        assert bench_common.device_name() == bench_common.cpu_name()
