"""The LM head's bias ([V_local], vocab-sliced like the weight): added in the chunk GEMM, db summed
in fp32: against an fp64 reference on CPU (the torch backend, and Triton in its interpreter),
then on a GPU at real sizes (the `gpu` marker: pytest -m gpu)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fused_loss import fused_linear_cross_entropy

from benchmarks.reference import reference_loss, rel_err
from test_fused_loss import (BACKENDS, OPTION_SETS, TOL, _assert_close, _inputs, option_case,
                             over_option_cases)
from test_fused_loss_gpu import _inputs as _gpu_inputs, on_gpu, on_two_ranks


# ---- bias ([V_local], vocab-sliced like the weight) ----

def _run_bias(hidden, weight, bias, labels, upstream=None, **kw):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = fused_linear_cross_entropy(h, w, labels, bias=b, **kw)
    (loss * upstream if upstream is not None else loss).sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _assert_close_bias(got, want, tol=TOL):
    _assert_close(got[:3], want[:3], tol)
    err = float((got[3].double() - want[3]).norm())
    limit = tol * float(want[3].norm()) + 1e-5 * want[3].numel() ** 0.5
    assert err <= limit, f"d_bias: error {err:.2e} > {limit:.2e}"


@over_option_cases(OPTION_SETS)
def test_bias_matches_fp64_reference(backend, reduction, options):
    hidden, weight, labels, upstream = option_case(backend, reduction, options)
    bias = torch.randn(weight.shape[0]) * 2
    got = _run_bias(hidden, weight, bias, labels, upstream, reduction=reduction,
                    backend=backend, chunk_size=5, **options)
    want = reference_loss(hidden, weight, labels, reduction=reduction, upstream=upstream,
                          bias=bias, **options)
    _assert_close_bias(got, want)
    assert got[3].dtype == bias.dtype and got[3].shape == bias.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5, 3), (3, 1, 1), (64, 16, 300)])
def test_bias_odd_sizes_and_all_ignored(backend, shape):
    hidden, weight, labels = _inputs(*shape, ignore_frac=0.0)
    bias = torch.randn(shape[2])
    for chunk in (None, 1, 7):
        got = _run_bias(hidden, weight, bias, labels, backend=backend, chunk_size=chunk)
        _assert_close_bias(got, reference_loss(hidden, weight, labels, bias=bias))
    labels.fill_(-100)
    for reduction in ("sum", "mean", "none"):
        got = _run_bias(hidden, weight, bias, labels, backend=backend, reduction=reduction,
                        upstream=torch.ones(shape[0]) if reduction == "none" else None)
        assert all(bool((t == 0).all()) for t in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_with_token_stats(backend):
    # the argmax and entropy are of the biased logits: a bias can move the prediction
    hidden, weight, labels = _inputs(9, 5, 300, ignore_frac=0.0)
    bias = torch.zeros(300)
    bias[17] = 100.0
    loss, aux = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, backend=backend,
                                           return_aux=True, token_stats=True)
    assert aux.predicted.tolist() == [17] * 9
    z = hidden.double() @ weight.double().t() + bias.double()
    entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
    torch.testing.assert_close(aux.entropy.double(), entropy, rtol=2e-6, atol=2e-6)


def test_bias_gradient_only_where_asked_and_bf16_rounded_once():
    hidden, weight, labels = _inputs(64, 16, 100, ignore_frac=0.0)
    bias = torch.randn(100)
    b = bias.clone().requires_grad_()  # only the bias wants a gradient
    fused_linear_cross_entropy(hidden, weight, labels, bias=b, reduction="mean").backward()
    want = reference_loss(hidden, weight, labels, bias=bias, reduction="mean")[3]
    assert rel_err(b.grad, want) < TOL
    # bf16 over 4 chunks: db is carried in fp32 and rounded once, like dh and dW
    hb, wb, bb = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    got = _run_bias(hb, wb, bb, labels, chunk_size=16, reduction="mean")[3]
    assert got.dtype == torch.bfloat16
    exact = reference_loss(hb, wb, labels, bias=bb, reduction="mean")[3]
    one_chunk = _run_bias(hb, wb, bb, labels, reduction="mean")[3]
    assert rel_err(got, exact) <= 1.1 * rel_err(one_chunk, exact) + 1e-3


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bias_through_torch_compile(reduction):
    hidden, weight, labels = _inputs(16, 8, 64)
    bias = torch.randn(64)
    upstream = torch.rand(16) if reduction == "none" else None

    def step(h, w, b, y):
        return fused_linear_cross_entropy(h, w, y, bias=b, reduction=reduction) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss = compiled(h, w, b, labels)
    (loss * upstream if upstream is not None else loss).sum().backward()
    want = reference_loss(hidden, weight, labels, bias=bias, reduction=reduction,
                          upstream=upstream)
    _assert_close_bias((loss.detach() / 2, h.grad / 2, w.grad / 2, b.grad / 2), want)


def test_bias_under_autocast_follows_f_linear():
    hidden, weight, labels = _inputs(40, 16, 300, seed=3)
    bias = torch.randn(300)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, labels, bias=b, chunk_size=16)
    loss.backward()
    want = _run_bias(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), labels,
                     chunk_size=16)
    assert b.grad.dtype == torch.float32
    for got, exact in zip((loss.detach(), h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, exact.to(got.dtype), rtol=0, atol=0)


def test_bias_bad_values_name_the_bias():
    hidden, weight, labels = _inputs(4, 3, 20)
    cases = [
        (torch.zeros(19), r"bias must be \[V_local\] = \[20\]"),
        (torch.zeros(20, 1), r"bias must be \[V_local\]"),
        (torch.zeros(20, dtype=torch.float16), "bias dtype torch.float16 differs from weight"),
        (torch.zeros(20).tolist(), "bias must be a torch.Tensor or None"),
        (torch.zeros(20, device="meta"), "bias .* and weight .* must be on one device"),
    ]
    for bias, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(hidden, weight, labels, bias=bias)


# ---- on a GPU ----

# ---- bias: added in the chunk GEMM (addmm), db summed in fp32 ----

def _bias_reference(hidden, weight, bias, labels, reduction="sum"):
    """fp64 loss, dh, dW, db (materialized logits: sizes here are small enough)."""
    h, w, b = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    loss = F.cross_entropy(F.linear(h, w, b), labels, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _bias_run(hidden, weight, bias, labels, fn=None, **kw):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    if fn is None:
        loss = fused_linear_cross_entropy(h, w, labels, bias=b, **kw)
    else:
        loss = fn(h, w, b, labels)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _eager_bias(h, w, b, y, reduction="sum"):
    return F.cross_entropy(F.linear(h, w, b).float(), y, reduction=reduction)


@on_gpu
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bias_fp32_against_fp64(reduction):
    hidden, weight, labels = _gpu_inputs(2048, 512, 50257, torch.float32, seed=21)
    bias = torch.randn(50257, device="cuda")
    got = _bias_run(hidden, weight, bias, labels, reduction=reduction, chunk_size=700)
    want = _bias_reference(hidden, weight, bias, labels, reduction)
    for name, a, b in zip(("loss", "dh", "dW", "db"), got, want):
        assert rel_err(a, b) < 1e-5, name


@on_gpu
def test_bias_bf16_as_accurate_as_eager():
    hidden, weight, labels = _gpu_inputs(4096, 2048, 32000, torch.bfloat16, seed=22)
    bias = (torch.randn(32000, device="cuda") * 0.5).bfloat16()
    want = _bias_reference(hidden, weight, bias, labels, "mean")
    ours = _bias_run(hidden, weight, bias, labels, reduction="mean", chunk_size=1024)
    eager = _bias_run(hidden, weight, bias, labels,
                      fn=lambda h, w, b, y: _eager_bias(h, w, b, y, "mean"))
    assert ours[3].dtype == torch.bfloat16
    assert rel_err(ours[0], want[0]) < 1e-3
    for name, a, e, b in zip(("dh", "dW", "db"), ours[1:], eager[1:], want[1:]):
        assert rel_err(a, b) <= 1.05 * rel_err(e, b) + 1e-4, (name, rel_err(a, b), rel_err(e, b))


@on_gpu
def test_bias_none_reduction_and_token_stats():
    hidden, weight, labels = _gpu_inputs(1024, 512, 32000, torch.float32, seed=23)
    bias = torch.randn(32000, device="cuda")
    bias[123] = 1e3  # every row's argmax
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    upstream = torch.rand(1024, device="cuda")
    loss, aux = fused_linear_cross_entropy(h, w, labels, bias=b, reduction="none",
                                           return_aux=True, token_stats=True)
    (loss * upstream).sum().backward()
    assert bool((aux.predicted == 123).all())
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref = F.cross_entropy(F.linear(h64, w64, b64), labels, reduction="none")
    (ref * upstream.double()).sum().backward()
    for name, a, r in zip(("loss", "dh", "dW", "db"), (loss, h.grad, w.grad, b.grad),
                          (ref, h64.grad, w64.grad, b64.grad)):
        assert rel_err(a, r) < 1e-5, name


@on_gpu
def test_bias_no_host_sync_and_compiled():
    hidden, weight, labels = _gpu_inputs(2048, 512, 32000, torch.bfloat16, seed=24)
    bias = torch.randn(32000, device="cuda").bfloat16()
    b = bias.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels, bias=b, check_labels=False)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_linear_cross_entropy(hidden, w, labels, bias=b, check_labels=False).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    def step(h, w, b, y):
        return fused_linear_cross_entropy(h, w, y, bias=b, reduction="mean") * 3.0

    compiled = torch.compile(step, fullgraph=True)
    for a, e in zip(_bias_run(hidden, weight, bias, labels, fn=compiled),
                    _bias_run(hidden, weight, bias, labels, fn=step)):
        torch.testing.assert_close(a, e)


def _vp_bias_worker(rank, hidden, weight, bias, labels):
    v = weight.shape[0]
    split = (v + 1) // 2
    sl = slice(0, split) if rank == 0 else slice(split, v)
    h = hidden.clone().requires_grad_()
    w, b = weight[sl].clone().requires_grad_(), bias[sl].clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, bias=b, vocab_start=sl.start, vocab_size=v,
                                      process_group=dist.group.WORLD)
    loss.backward()
    dh = h.grad.float()
    dist.all_reduce(dh)
    return loss, dh, w.grad, b.grad


@on_gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_vocab_parallel_bias_over_nccl():
    hidden, weight, labels = _gpu_inputs(2048, 1024, 64001, torch.float32, seed=25)
    bias = torch.randn(64001, device="cuda")
    single = _bias_run(hidden, weight, bias, labels)
    ranks = on_two_ranks(_vp_bias_worker, hidden, weight, bias, labels)
    split = (64001 + 1) // 2
    for rank, (loss, dh, dw, db) in enumerate(ranks):
        sl = slice(0, split) if rank == 0 else slice(split, 64001)
        assert rel_err(loss, single[0].cpu()) < 1e-6
        assert rel_err(dh, single[1].cpu()) < 1e-5
        assert rel_err(dw, single[2][sl].cpu()) < 1e-5
        assert rel_err(db, single[3][sl].cpu()) < 1e-5
