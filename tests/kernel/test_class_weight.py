"""Per-class weights (class_weight, F.cross_entropy's `weight`): against an fp64 reference on CPU
(the torch backend, and Triton in its interpreter), then on a GPU at real sizes (the `gpu`
marker: pytest -m gpu)."""

import pytest
import torch
import torch.nn.functional as F

from fused_loss import fused_linear_cross_entropy

from benchmarks.reference import reference_loss, rel_err
from fused_ce_reference import assert_predicted
from test_bias import _assert_close_bias
from test_fused_loss import (BACKENDS, TOL, _assert_close, _inputs, _run, option_case,
                             over_option_cases)
from test_fused_loss_gpu import _inputs as _gpu_inputs, on_gpu


# ---- per-class weights (class_weight, F.cross_entropy's `weight`) ----

CLASS_WEIGHT_OPTIONS = [{}, {"z_loss": 1e-3}, {"logit_softcap": 4.0, "ignore_index": 7}]


@over_option_cases(CLASS_WEIGHT_OPTIONS)
def test_class_weight_matches_fp64_reference(backend, reduction, options):
    hidden, weight, labels, upstream = option_case(backend, reduction, options)
    class_weight = torch.rand(weight.shape[0]) * 3
    got = _run(hidden, weight, labels, upstream, reduction=reduction, backend=backend,
               chunk_size=5, class_weight=class_weight, **options)
    want = reference_loss(hidden, weight, labels, reduction=reduction, upstream=upstream,
                          class_weight=class_weight, **options)
    _assert_close(got, want)
    if reduction == "mean" and not options:  # exactly torch's definition of "mean"
        z = hidden.double() @ weight.double().t()
        torch_mean = F.cross_entropy(z, labels, weight=class_weight.double())
        assert rel_err(got[0], torch_mean) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weight_with_bias_and_token_stats(backend):
    hidden, weight, labels = _inputs(12, 5, 300)
    bias, class_weight = torch.randn(300), torch.rand(300)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss, aux = fused_linear_cross_entropy(h, w, labels, bias=b, class_weight=class_weight,
                                           reduction="mean", backend=backend, return_aux=True,
                                           token_stats=True, z_loss=1e-2)
    loss.backward()
    want = reference_loss(hidden, weight, labels, bias=bias, class_weight=class_weight,
                          reduction="mean", z_loss=1e-2)
    _assert_close_bias((loss.detach(), h.grad, w.grad, b.grad), want)
    z = hidden.double() @ weight.double().t() + bias.double()
    assert_predicted(aux.predicted, z, labels, aux.correct)  # of the biased logits
    valid = labels != -100
    lse = torch.logsumexp(hidden.double() @ weight.double().t() + bias.double(), 1) * valid
    row_w = torch.where(valid, class_weight.double()[labels.clamp(min=0)], 0.0)
    assert abs(float(aux.z_loss) - float(1e-2 * (row_w * lse ** 2).sum() / row_w.sum())) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_class_weight_zero_total_and_all_ignored_give_zero(backend, reduction):
    hidden, weight, labels = _inputs(9, 4, 30, ignore_frac=0.0)
    for class_weight, fill in ((torch.zeros(30), None), (torch.rand(30), -100)):
        y = labels.clone() if fill is None else torch.full_like(labels, fill)
        loss, dh, dw = _run(hidden, weight, y, reduction=reduction, backend=backend,
                            class_weight=class_weight,
                            upstream=torch.ones(9) if reduction == "none" else None)
        assert torch.all(loss == 0) and torch.all(dh == 0) and torch.all(dw == 0)


def test_class_weight_through_torch_compile():
    hidden, weight, labels = _inputs(16, 8, 64)
    class_weight = torch.rand(64)
    for reduction in ("mean", "none"):
        upstream = torch.rand(16) if reduction == "none" else None
        compiled = torch.compile(
            lambda h, w, y: fused_linear_cross_entropy(h, w, y, reduction=reduction,
                                                       class_weight=class_weight),
            fullgraph=True, backend="aot_eager")
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = compiled(h, w, labels)
        (loss * upstream if upstream is not None else loss).sum().backward()
        _assert_close((loss.detach(), h.grad, w.grad),
                      reference_loss(hidden, weight, labels, reduction=reduction,
                                     upstream=upstream, class_weight=class_weight))


def test_class_weight_bad_values_name_the_option():
    hidden, weight, labels = _inputs(4, 3, 20)
    cases = [
        (dict(class_weight=torch.ones(19)), r"class_weight must be \[vocab_size\] = \[20\]"),
        (dict(class_weight=torch.ones(20, dtype=torch.long)), "class_weight must be a floating"),
        (dict(class_weight=[1.0] * 20), "class_weight must be a floating"),
        (dict(class_weight=torch.ones(20, device="meta")), "class_weight .* must be on the"),
        (dict(class_weight=torch.ones(20), label_smoothing=0.1),
         "class_weight with label_smoothing is not supported"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(hidden, weight, labels, **kw)


# ---- on a GPU ----

# ---- per-class weights: the Triton statistics and gradient passes apart,
# the gradient rows scaled by the label's weight ----

@on_gpu
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_class_weight_fp32_against_fp64(reduction):
    hidden, weight, labels = _gpu_inputs(2048, 512, 50257, torch.float32, seed=31)
    class_weight = torch.rand(50257, device="cuda") * 2
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    upstream = torch.rand(2048, device="cuda")
    loss = fused_linear_cross_entropy(h, w, labels, class_weight=class_weight,
                                      reduction=reduction, chunk_size=700, z_loss=1e-4)
    (loss * upstream if reduction == "none" else loss).sum().backward()
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    z = h64 @ w64.t()
    valid = labels != -100
    row_w = torch.where(valid, class_weight.double()[labels.clamp(min=0)], 0.0)
    per = (F.cross_entropy(z, labels, weight=class_weight.double(), reduction="none")
           + 1e-4 * torch.logsumexp(z, 1) ** 2 * row_w)
    ref = {"sum": per.sum(), "mean": per.sum() / row_w.sum(), "none": per}[reduction]
    (ref * upstream.double() if reduction == "none" else ref).sum().backward()
    for name, a, r in zip(("loss", "dh", "dW"), (loss, h.grad, w.grad), (ref, h64.grad,
                                                                      w64.grad)):
        assert rel_err(a, r) < 1e-5, name


@on_gpu
def test_class_weight_bf16_no_host_sync():
    hidden, weight, labels = _gpu_inputs(2048, 512, 32000, torch.bfloat16, seed=32)
    class_weight = torch.rand(32000, device="cuda")
    w = weight.clone().requires_grad_()
    kw = dict(check_labels=False, class_weight=class_weight, reduction="mean")
    fused_linear_cross_entropy(hidden, w, labels, **kw)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_linear_cross_entropy(hidden, w, labels, **kw).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = F.cross_entropy((hidden @ weight.t()).float(), labels, weight=class_weight)
    assert abs(float(fused_linear_cross_entropy(hidden, weight, labels, **kw)) -
               float(eager)) < 1e-2
