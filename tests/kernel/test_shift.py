"""The causal shift (labels of t + 1 scored at t, hidden states not copied): against an fp64
reference on CPU (the torch backend, and Triton in its interpreter), then on a GPU at real sizes
(the `gpu` marker: pytest -m gpu)."""

import pytest
import torch
import torch.nn.functional as F

from fused_loss import fused_linear_cross_entropy

from benchmarks.reference import reference_loss, rel_err
from fused_ce_reference import assert_predicted
from test_bias import _assert_close_bias
from test_fused_loss import BACKENDS, _assert_close, _inputs, _run, _tensor_shapes
from test_fused_loss_gpu import _inputs as _gpu_inputs, on_gpu


# ---- causal shift (labels of t + 1 scored at t, hidden states not copied) ----

def _shift_reference(hidden, weight, labels, upstream=None, **kw):
    """The unshifted op's fp64 reference on hidden[..., :-1, :] and labels[..., 1:], with dh
    padded by the last position's zero gradient."""
    loss, dh, dw, *db = reference_loss(hidden[..., :-1, :], weight, labels[..., 1:],
                                       upstream=upstream, **kw)
    dh = torch.cat([dh.reshape(*hidden.shape[:-2], -1, hidden.shape[-1]),
                    torch.zeros_like(hidden[..., -1:, :], dtype=torch.float64)], dim=-2)
    return (loss, dh, dw, *db)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-3, "logit_softcap": 4.0},
                                     {"label_smoothing": 0.1, "ignore_index": 7}],
                         ids=["plain", "zloss,softcap", "smoothing,ignore7"])
def test_shift_matches_fp64_reference(backend, reduction, options):
    v = 4099 if backend == "torch" else 517
    hidden, weight, labels = _inputs(21, 6, v, ignore_index=options.get("ignore_index", -100))
    hidden, labels = hidden.reshape(3, 7, 6), labels.reshape(3, 7)
    upstream = torch.rand(3, 6) if reduction == "none" else None
    got = _run(hidden, weight, labels, upstream, reduction=reduction, backend=backend,
               chunk_size=5, shift=True, **options)
    want = _shift_reference(hidden, weight, labels, upstream, reduction=reduction, **options)
    assert got[0].shape == want[0].shape  # "none": [3, 6]
    _assert_close(got, want)
    assert bool((got[1][:, -1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_with_bias_class_weight_and_token_stats(backend):
    hidden, weight, labels = _inputs(10, 5, 300)
    hidden, labels = hidden.reshape(2, 5, 5), labels.reshape(2, 5)
    bias, class_weight = torch.randn(300), torch.rand(300)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    loss, aux = fused_linear_cross_entropy(h, w, labels, bias=b, class_weight=class_weight,
                                           reduction="mean", backend=backend, shift=True,
                                           return_aux=True, token_stats=True)
    loss.backward()
    want = _shift_reference(hidden, weight, labels, bias=bias, class_weight=class_weight,
                            reduction="mean")
    _assert_close_bias((loss.detach(), h.grad, w.grad, b.grad), want)
    assert aux.lse.shape == aux.entropy.shape == aux.predicted.shape == (2, 4)
    assert int(aux.valid_tokens) == int((labels[:, 1:] != -100).sum())
    z = hidden[:, :-1].reshape(-1, 5).double() @ weight.double().t() + bias.double()
    assert_predicted(aux.predicted, z, labels[:, 1:], aux.correct)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_one_position_scores_nothing(backend):
    hidden, weight, labels = _inputs(4, 3, 20, ignore_frac=0.0)
    for reduction in ("sum", "mean", "none"):
        loss, dh, dw = _run(hidden.reshape(4, 1, 3), weight, labels.reshape(4, 1), backend=backend,
                            reduction=reduction, shift=True,
                            upstream=torch.ones(4, 0) if reduction == "none" else None)
        assert torch.all(loss == 0) and torch.all(dh == 0) and torch.all(dw == 0)
        assert loss.shape == ((4, 0) if reduction == "none" else ())


def test_shift_does_not_copy_the_hidden_states():
    # only the labels are shifted: no allocation of hidden's size before the op's own
    hidden, weight, labels = _inputs(64, 16, 100)
    copies = _tensor_shapes(lambda op: op is not torch.ops.fused_loss.lce_sum)
    with copies as seen, torch.no_grad():
        fused_linear_cross_entropy(hidden.reshape(4, 16, 16), weight, labels.reshape(4, 16),
                                   shift=True)
    assert (63, 16) not in seen.shapes and (4, 15, 16) not in seen.shapes


def test_shift_through_torch_compile_and_bad_values():
    hidden, weight, labels = _inputs(24, 8, 64)
    hidden, labels = hidden.reshape(4, 6, 8), labels.reshape(4, 6)
    compiled = torch.compile(
        lambda h, w, y: fused_linear_cross_entropy(h, w, y, shift=True, reduction="mean"),
        fullgraph=True, backend="aot_eager")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled(h, w, labels).backward()
    _assert_close((compiled(hidden, weight, labels), h.grad, w.grad),
                  _shift_reference(hidden, weight, labels, reduction="mean"))
    with pytest.raises(ValueError, match="shift must be True or False"):
        fused_linear_cross_entropy(hidden, weight, labels, shift=1)
    with pytest.raises(ValueError, match="shift needs a sequence dimension"):
        fused_linear_cross_entropy(hidden[0, 0], weight, labels[0, 0], shift=True)


# ---- on a GPU ----

# ---- causal shift: labels shifted, hidden states not copied ----

@on_gpu
def test_shift_fp32_against_fp64_no_sync_no_hidden_copy():
    b, t, d, v = 4, 1025, 512, 32000
    hidden, weight, labels = _gpu_inputs(b * t, d, v, torch.float32, seed=41)
    hidden, labels = hidden.reshape(b, t, d), labels.reshape(b, t)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused_linear_cross_entropy(h, w, labels, shift=True, check_labels=False)  # warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_cross_entropy(h, w, labels, shift=True, check_labels=False,
                                          reduction="mean")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the forward holds the logits chunk, dh, dW and O(N) rows: no second copy of hidden
    # (8.4 MB here, above the 4 MiB slack)
    peak = torch.cuda.max_memory_allocated() - base
    logits = min(b * t, (1 << 30) // (v * 4)) * v * 4
    assert peak <= logits + hidden.numel() * 4 + weight.numel() * 4 + (4 << 20), peak
    h.grad = w.grad = None
    loss.backward()
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    ref = F.cross_entropy((h64[:, :-1] @ w64.t()).flatten(0, 1), labels[:, 1:].flatten())
    ref.backward()
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(h.grad, h64.grad) < 1e-5 and rel_err(w.grad, w64.grad) < 1e-5
    assert bool((h.grad[:, -1] == 0).all())
