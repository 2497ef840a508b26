"""The kernel against an fp64 reference on CPU: the torch backend, and Triton in its interpreter.

On a machine without CUDA the Triton backend runs under TRITON_INTERPRET=1 (numpy; conftest
sets it), in fp32 only: the triton 3.6 interpreter's bf16 dot is broken. The core's GPU tests are
in test_fused_loss_gpu; each option's own file (test_bias, test_class_weight, test_shift,
test_token_stats) holds its CPU and GPU cases.
"""

import pytest
import torch
import torch.nn.functional as F

from fused_loss import FusedLinearCrossEntropy, fused_linear_cross_entropy
from fused_loss.options import LossOptions
from fused_loss.plan import plan_chunks

from benchmarks.reference import reference_loss, rel_err
from fused_ce_reference import softcap_logits, triton_softcap, ulps

BACKENDS = ["torch", "triton"]
TOL = 2e-6  # fp32 kernel vs fp64 reference, relative L2


def _inputs(n, d, v, *, ignore_frac=0.2, ignore_index=-100, seed=None, device="cpu"):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d ** 0.5 * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return hidden.to(device), weight.to(device), labels.to(device)


def _run(hidden, weight, labels, upstream=None, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, **kw)
    (loss * upstream if upstream is not None else loss).sum().backward()
    return loss.detach(), h.grad, w.grad


def _assert_close(got, want, tol=TOL):
    """Relative L2 error, with an absolute floor: a confident token's loss lse - target is a
    cancellation of two O(10) numbers, exact only to fp32 eps * 10 in absolute terms."""
    for name, g, w in zip(("loss", "d_hidden", "d_weight"), got, want):
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = float((g.double() - w).norm())
        limit = tol * float(w.norm()) + 1e-5 * w.numel() ** 0.5
        assert err <= limit, f"{name}: error {err:.2e} > {limit:.2e} (|ref| {w.norm():.2e})"


OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"logit_softcap": 4.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "logit_softcap": 2.5, "ignore_index": 7},
]


def option_case(backend, reduction, options):
    """The options' small case: 23 rows, D = 7, V no multiple of any block (4099 spans two
    4096-wide blocks on the torch backend; 517 in the interpreter), the options' ignore_index,
    and an upstream gradient per token under "none": (hidden, weight, labels, upstream)."""
    hidden, weight, labels = _inputs(23, 7, 4099 if backend == "torch" else 517,
                                     ignore_index=options.get("ignore_index", -100))
    return hidden, weight, labels, torch.rand(23) if reduction == "none" else None


def over_option_cases(option_sets):
    """An option test's parameters: each backend, each reduction, each of `option_sets`."""
    def mark(test):
        test = pytest.mark.parametrize("options", option_sets,
                                       ids=lambda o: ",".join(o) or "plain")(test)
        test = pytest.mark.parametrize("reduction", ["sum", "mean", "none"])(test)
        return pytest.mark.parametrize("backend", BACKENDS)(test)
    return mark


@over_option_cases(OPTION_SETS)
def test_matches_fp64_reference(backend, reduction, options):
    hidden, weight, labels, upstream = option_case(backend, reduction, options)  # chunks of 5 rows
    got = _run(hidden, weight, labels, upstream, reduction=reduction, backend=backend,
               chunk_size=5, **options)
    want = reference_loss(hidden, weight, labels, reduction=reduction, upstream=upstream,
                          **options)
    _assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5, 3), (3, 1, 1), (64, 16, 300)])
def test_odd_sizes(backend, shape):
    hidden, weight, labels = _inputs(*shape, ignore_frac=0.0)
    for chunk in (None, 1, 7):
        got = _run(hidden, weight, labels, backend=backend, chunk_size=chunk)
        _assert_close(got, reference_loss(hidden, weight, labels))


def test_leading_dims_and_non_contiguous_hidden():
    hidden, weight, labels = _inputs(24, 9, 50)
    h3 = hidden.reshape(4, 6, 9).transpose(0, 1)  # [6, 4, 9] view, not contiguous
    y3 = labels.reshape(4, 6).t()
    got = _run(h3, weight, y3, reduction="none", upstream=torch.ones(6, 4))
    want = reference_loss(h3, weight, y3, reduction="none")
    _assert_close(got, want)
    assert got[0].shape == (6, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_tokens_ignored_gives_zero_not_nan(backend, reduction):
    hidden, weight, labels = _inputs(9, 4, 30)
    labels.fill_(-100)
    loss, dh, dw = _run(hidden, weight, labels, reduction=reduction, backend=backend,
                        upstream=torch.ones(9) if reduction == "none" else None)
    assert torch.all(loss == 0) and torch.all(dh == 0) and torch.all(dw == 0)


def test_empty_batch():
    weight = torch.randn(11, 4, requires_grad=True)
    hidden = torch.randn(0, 4, requires_grad=True)
    loss = fused_linear_cross_entropy(hidden, weight, torch.empty(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.all(weight.grad == 0) and hidden.grad.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_hidden_propagates(backend):
    hidden, weight, labels = _inputs(6, 4, 20, ignore_frac=0.0)
    hidden[2, 1] = float("nan")
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels_raise(backend):
    hidden, weight, labels = _inputs(10, 4, 20, ignore_frac=0.0)
    labels[3], labels[7] = 20, -5
    with pytest.raises(ValueError, match=r"labels: 2 value\(s\) outside \[0, 20\).*e\.g\. 20"):
        fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    # switched off: no error and no out-of-bounds access; those rows just have no target
    loss = fused_linear_cross_entropy(hidden, weight, labels, backend=backend,
                                      check_labels=False, reduction="none")
    assert torch.isfinite(loss).all()


def test_aux_statistics():
    hidden, weight, labels = _inputs(12, 5, 40)
    loss, aux = fused_linear_cross_entropy(hidden, weight, labels, z_loss=0.01,
                                           reduction="mean", return_aux=True)
    valid = labels != -100
    lse = torch.logsumexp(hidden.double() @ weight.double().t(), dim=1) * valid
    assert rel_err(aux.lse, lse) < TOL
    assert int(aux.valid_tokens) == int(valid.sum())
    assert abs(float(aux.z_loss) - float(0.01 * (lse ** 2).sum() / valid.sum())) < 1e-5
    want = reference_loss(hidden, weight, labels, z_loss=0.01, reduction="mean")[0]
    assert rel_err(loss, want) < TOL


def test_gradient_only_where_asked():
    hidden, weight, labels = _inputs(8, 4, 16)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels).backward()  # hidden needs no grad
    want_loss, _, want_dw = reference_loss(hidden, weight, labels)
    assert rel_err(w.grad, want_dw) < TOL
    with torch.no_grad():  # validation: loss only, the same value
        assert rel_err(fused_linear_cross_entropy(hidden, w, labels), want_loss) < TOL


def test_second_backward_is_refused():
    # the gradients were computed in forward and scaled in place by the first backward
    hidden, weight, labels = _inputs(8, 4, 16)
    w = weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hidden, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("bad, match", [
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(z_loss=-1.0), "z_loss must be >= 0"),
    (dict(logit_softcap=0.0), "logit_softcap must be > 0"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(chunk_budget_bytes=50), "chunk_budget_bytes=50 is smaller than one row"),
    (dict(vocab_start=10, vocab_size=12), r"weight rows \[10, 30\) exceed vocab_size=12"),
])
def test_bad_options_name_the_option(bad, match):
    hidden, weight, labels = _inputs(4, 3, 20)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hidden, weight, labels, **bad)


def test_bad_tensors_name_the_tensor():
    hidden, weight, labels = _inputs(4, 3, 20)
    cases = [
        ((hidden.half(), weight, labels), "weight dtype torch.float32 differs from hidden"),
        ((hidden.double(), weight.double(), labels), "hidden must be float32"),
        ((hidden, weight, labels.float()), "labels must be int64"),
        ((hidden, weight[:, :2], labels), "hidden .* has D=3 but weight .* D=2"),
        ((hidden, weight, labels[:3]), "labels shape"),
        ((hidden, weight.reshape(-1), labels), r"weight must be \[V_local, D\]"),
        ((hidden, weight, labels.tolist()), "labels must be a torch.Tensor"),
        ((hidden.to("meta"), weight.to("meta"), labels), r"must be on one device"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(*args)


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.delenv("TRITON_INTERPRET")
    hidden, weight, labels = _inputs(4, 3, 20)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fused_linear_cross_entropy(hidden, weight, labels, backend="triton")


def test_chunk_rows_follow_the_budget():
    def rows(n, d, v, element_size, chunk_size=None, budget=None, **kw):
        return plan_chunks(n, d, v, element_size, chunk_size=chunk_size,
                           chunk_budget_bytes=budget, **kw).rows

    # 1 GiB of bf16 logits at V=128256 holds 4186 rows; 8192 tokens -> 2 chunks of 4096 where
    # one chunk would hold more memory: 4096 more rows of logits against no carry (16-bit
    # dW), or against an fp32 carry of V*D*2 B with D=2048 < 4096
    assert rows(8192, 4096, 128256, 2, weight_grad_fp32=False) == 4096
    assert rows(8192, 2048, 128256, 2) == 4096
    assert rows(16384, 2048, 151936, 2) == 3328  # 5 balanced chunks
    assert rows(100, 8, 1000, 4) == 100  # fits: one chunk
    assert rows(10, 1, 1000, 4, budget=4000 * 3) == 3  # the cap binds (a 1-wide carry)
    # where the carry's backward moment (1000 x 8 x 4 B = 8 rows) is larger, the chunks grow
    # to it at no memory: 2 chunks of 5
    assert rows(10, 8, 1000, 4, budget=4000 * 3) == 5
    assert rows(10, 8, 1000, 4, chunk_size=4) == 4


def test_module_is_a_drop_in_head():
    torch.manual_seed(0)
    head = FusedLinearCrossEntropy(6, 30, reduction="mean", z_loss=1e-4)
    linear = torch.nn.Linear(6, 30, bias=False)
    assert head.state_dict().keys() == linear.state_dict().keys()
    linear.load_state_dict(head.state_dict())
    hidden, _, labels = _inputs(10, 6, 30)
    want = reference_loss(hidden, linear.weight, labels, reduction="mean", z_loss=1e-4)[0]
    assert rel_err(head(hidden, labels), want) < TOL


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_torch_compile_sees_one_opaque_op(reduction):
    hidden, weight, labels = _inputs(16, 8, 64)
    upstream = torch.rand(16) if reduction == "none" else None

    def step(h, w, y):
        return fused_linear_cross_entropy(h, w, y, reduction=reduction, z_loss=1e-3) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = compiled(h, w, labels)
    (loss * upstream if upstream is not None else loss).sum().backward()
    ref = reference_loss(hidden, weight, labels, reduction=reduction, z_loss=1e-3,
                         upstream=upstream)
    _assert_close((loss.detach() / 2, h.grad / 2, w.grad / 2), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 3 * 4096 + 5])  # 4096 = the Triton block
@pytest.mark.parametrize("src_dtype, out_dtype, in_place", [
    (torch.float32, torch.bfloat16, False),  # the fp32 dW carry -> the weight's dtype
    (torch.bfloat16, torch.bfloat16, True),
    (torch.float32, torch.float32, True),
])
@pytest.mark.parametrize("unit", [False, True])  # exactly 1: the Triton pass skips only in place
def test_scale_pass(backend, n, src_dtype, out_dtype, in_place, unit):
    from fused_loss.chunked import rows_backend
    src = (torch.randn(n) * 100).to(src_dtype)
    scale = torch.tensor(1.0 if unit else torch.rand(()).item() + 0.5)
    want = (src.double() * scale.double()).to(out_dtype)  # one rounding, from the exact product
    out = src if in_place else torch.full((n,), float("nan"), dtype=out_dtype)
    version = out._version
    rows_backend(backend).scale_into(src, scale, out)
    assert out._version > version  # autograd sees the write: a second backward is refused
    # within one bf16 ulp: the interpreter truncates fp32 -> bf16 where a GPU rounds to
    # nearest (the GPU test checks that against torch, bit for bit)
    torch.testing.assert_close(out.double(), want.double(), rtol=2 ** -7, atol=0)
    if backend == "torch" and n:  # fp32 product, one rounding: the exact one but for ties
        assert (out.double() == want.double()).double().mean() >= 0.99


def test_weight_grad_carried_in_fp32_is_as_accurate_as_one_chunk():
    # bf16: a 16-bit dW rounded after each of 16 chunks drifts; the fp32 carry rounds once
    hidden, weight, labels = _inputs(512, 64, 1000, ignore_frac=0.0)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    want = reference_loss(hidden, weight, labels)[2]
    one_chunk = rel_err(_run(hidden, weight, labels)[2], want)
    carried = rel_err(_run(hidden, weight, labels, chunk_size=32)[2], want)
    rounded = rel_err(_run(hidden, weight, labels, chunk_size=32, weight_grad_fp32=False)[2],
                      want)
    assert carried <= 1.1 * one_chunk < rounded
    assert _run(hidden, weight, labels, chunk_size=32)[2].dtype == torch.bfloat16


def _tensor_shapes(keep):
    """A dispatch mode recording the shapes of the tensors made by the ops `keep(func)` selects."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and keep(func.overloadpacket):
                self.shapes.append(tuple(out.shape))
            return out

    return Shapes()


def test_backward_allocates_only_the_weight_grad():
    # autograd would hand the op zero "gradients" for its unused dh / dW outputs (a second
    # dW-sized buffer at the backward's peak) unless the op opts out of materializing them
    allocations = _tensor_shapes(lambda op: op in (torch.ops.aten.zeros, torch.ops.aten.zeros_like,
                                                   torch.ops.aten.empty_like, torch.ops.aten.empty))
    hidden, weight, labels = _inputs(64, 16, 100)
    h = hidden.bfloat16().requires_grad_()
    w = weight.bfloat16().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, chunk_size=16)
    with allocations as seen:
        loss.backward()
    # the bf16 dh and dW, each rounded from its fp32 carry, nothing else
    assert seen.shapes == [(64, 16), (100, 16)]


def test_gradient_through_the_ops_side_outputs_is_refused():
    # the sum op's lse / dh / dW outputs carry no gradient: an error, never a silent zero
    hidden, weight, labels = _inputs(8, 4, 16)
    w = weight.clone().requires_grad_()
    loss, lse, *_ = torch.ops.fused_loss.lce_sum(
        hidden, w, labels, **LossOptions(vocab_size=16).to_op_args(), group_name="",
        backend="torch", chunk=8, want_grad=True, carry_fp32=False, check_labels=False)
    with pytest.raises(RuntimeError, match="through its loss output only"):
        (loss + lse.sum()).backward()


def test_eager_calls_skip_the_dispatcher_with_the_custom_ops_results():
    # eager runs the sum op through _EagerSum (the dispatcher's host time: NOTES attempt 18);
    # the custom op, what torch.compile sees, gives the same loss and gradients, bit for bit
    from fused_loss.op import sum_with_grad
    hidden, weight, labels = _inputs(40, 8, 100)
    kw = dict(**LossOptions(vocab_size=100).to_op_args(), group_name="", backend="torch",
              chunk=16, want_grad=True, carry_fp32=True, check_labels=False)
    results = []
    for call in (sum_with_grad, torch.ops.fused_loss.lce_sum):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = call(h, w, labels, None, None, torch.tensor(0.5), **kw)[0]
        (loss * 0.5).backward()
        results.append((loss, h.grad, w.grad, type(loss.grad_fn).__name__))
    assert results[0][3] == "_EagerSumBackward" != results[1][3]
    for ours, op in zip(results[0][:3], results[1][:3]):
        assert torch.equal(ours, op)


def test_eager_host_path_binds_no_signature_and_copies_no_options(monkeypatch):
    # host time before the first GEMM is exposed whenever a step starts from an idle device
    # (NOTES attempt 19): an autograd.Function with a separate setup_context binds every call's
    # arguments through inspect.signature, and dataclasses.asdict deep-copies the options;
    # together ~40 us per call on a CPU core
    import copy
    import inspect

    def refuse(*args, **kwargs):
        raise AssertionError("called on the eager host path")

    hidden, weight, labels = _inputs(12, 8, 50)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels, reduction="mean")  # warm: lazy imports
    monkeypatch.setattr(inspect, "signature", refuse)
    monkeypatch.setattr(copy, "deepcopy", refuse)
    fused_linear_cross_entropy(hidden, w, labels, reduction="mean").backward()
    assert w.grad is not None


@pytest.mark.parametrize("kw", [dict(reduction="mean"),
                                dict(reduction="sum", grad_scale=0.5, return_aux=True,
                                     token_stats=True)], ids=["mean", "trainer"])
def test_the_first_gemm_is_the_first_kernel(kw):
    # a call that starts from an idle device waits until its first GEMM is launched: the label
    # count, the mean's denominator, the outputs and the scale come after it (NOTES attempt 21;
    # ~50 us of host time per small kernel on an H200's host; the label check, on by default,
    # is a host sync by design)
    from torch.utils._python_dispatch import TorchDispatchMode

    no_kernel = {"view", "reshape", "_unsafe_view", "empty", "empty_like", "empty_strided",
                 "slice", "t", "transpose", "as_strided", "detach", "alias", "lift_fresh"}

    class Launches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in no_kernel:
                launched.append(name)
            return func(*args, **(kwargs or {}))

    hidden, weight, labels = _inputs(40, 8, 100)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, labels, **kw)  # warm: lazy imports
    launched = []
    with Launches():
        fused_linear_cross_entropy(hidden, w, labels, chunk_size=16, check_labels=False, **kw)
    assert launched[0] == "mm", launched[:8]


def test_announced_gradient_through_torch_compile():
    # grad_scale is one more tensor input of the opaque op; the traced backward divides by it
    hidden, weight, labels = _inputs(16, 8, 64)
    scale = torch.tensor(0.25)

    def step(h, w, y):
        return fused_linear_cross_entropy(h, w, y, grad_scale=scale, chunk_size=5) * scale

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = compiled(h, w, labels)
    loss.backward()
    ref = reference_loss(hidden, weight, labels)
    _assert_close((loss.detach() / 0.25, h.grad / 0.25, w.grad / 0.25), ref)


def test_compiled_with_the_weight_grad_carried_in_fp32():
    # the op's fake says dW is fp32 (the carry) and the compiled backward rounds it to bf16
    hidden, weight, labels = _inputs(64, 16, 100)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    compiled = torch.compile(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_size=16),
                             fullgraph=True, backend="aot_eager")
    w = weight.clone().requires_grad_()
    compiled(hidden, w, labels).backward()
    eager = _run(hidden, weight, labels, chunk_size=16)[2]
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad, eager)


@pytest.mark.parametrize("lo, hi", [(1e-6, 1e-3), (1e-3, 0.6), (0.6, 3.0), (3.0, 9.0),
                                    (9.0, 1e3)])
def test_triton_capped_logit_within_a_few_ulps(lo, hi):
    # the interpreter's tanh (no libdevice there); the GPU test checks libdevice's. The former
    # 1 - 2/(exp(2u) + 1) was 1e6 ulps off at |z|/cap ~ 1e-5 and 2e3 at 1e-2
    z = softcap_logits(64, 1024, 30.0, lo, hi)
    assert ulps(triton_softcap(z, 30.0), 30.0 * torch.tanh(z.double() / 30.0)) <= 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap, lo, hi", [(30.0, 1e-5, 0.1), (1.0, 2.0, 12.0)],
                         ids=["small_z_over_cap", "large_z_over_cap"])
def test_softcap_loss_and_gradients_elementwise(backend, cap, lo, hi):
    # weight = I: the logits are the hidden states exactly and dh is the row gradient itself
    # (no GEMM rounding), so each element's error is the row passes' own. Small |z|/cap
    # needs an accurate tanh (the old Triton one: loss 1.1e-6, dh 4.2e-6); large |z|/cap an
    # accurate derivative (1 - tanh^2 cancels: dh elements off by 100% at |z|/cap ~ 10)
    v = 64
    hidden, weight = softcap_logits(48, v, cap, lo, hi, seed=1), torch.eye(v)
    labels = torch.randint(0, v, (48,), generator=torch.Generator().manual_seed(2))
    upstream = torch.ones(48)
    loss, dh, dw = _run(hidden, weight, labels, upstream, reduction="none", backend=backend,
                        logit_softcap=cap)
    want = reference_loss(hidden, weight, labels, reduction="none", upstream=upstream,
                          logit_softcap=cap)
    torch.testing.assert_close(loss.double(), want[0], rtol=5e-7, atol=0)
    torch.testing.assert_close(dh.double(), want[1], rtol=3e-6, atol=0)
    assert rel_err(dw, want[2]) < 1e-6


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_autocast_is_followed_as_f_linear_would(reduction, weight_dtype):
    # under autocast the op runs in autocast's dtype (bf16 here), whatever the parameters'
    # dtype, exactly as if called with bf16 inputs; the gradients return in each input's dtype
    hidden, weight, labels = _inputs(40, 16, 300, seed=3)
    weight = weight.to(weight_dtype)
    upstream = torch.rand(40) if reduction == "none" else None
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=16)
        (loss * upstream if upstream is not None else loss).sum().backward()  # inside, too
    want = _run(hidden.bfloat16(), weight.bfloat16(), labels, upstream, reduction=reduction,
                chunk_size=16)
    assert loss.dtype == torch.float32 and (h.grad.dtype, w.grad.dtype) == (torch.float32,
                                                                            weight_dtype)
    for got, exact in zip((loss.detach(), h.grad, w.grad), want):
        torch.testing.assert_close(got, exact.to(got.dtype), rtol=0, atol=0)
    # and so within bf16's error of the fp64 loss, not fp32's: autocast was not ignored
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = F.cross_entropy(F.linear(hidden, weight), labels, reduction=reduction)
    ref = reference_loss(hidden, weight, labels, reduction=reduction)[0]
    assert rel_err(loss, ref) > 1e-5 and rel_err(loss, eager) < 1e-5


@pytest.mark.parametrize("name", ["lce_sum", "lce_rows", "lce_rows_backward"])
def test_op_boundary_has_names_not_positions(name):
    # tensors positional, everything else keyword-only: autograd then asks a gradient for the
    # tensors alone and the options travel by name, so adding an argument cannot shift one
    args = getattr(torch.ops.fused_loss, name).default._schema.arguments
    for a in args:
        tensor = isinstance(a.type, torch._C.TensorType) or (
            isinstance(a.type, torch._C.OptionalType)
            and isinstance(a.type.getElementType(), torch._C.TensorType))  # bias
        assert a.kwarg_only != tensor, a
    assert set(LossOptions().to_op_args()) <= {a.name for a in args if a.kwarg_only}


def test_loss_options_round_trip_by_name_with_one_off():
    opts = LossOptions(ignore_index=3, label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0,
                       vocab_start=2, vocab_size=9)
    assert LossOptions.from_op_args({**opts.to_op_args(), "backend": "torch"}) == opts
    assert LossOptions().logit_softcap is None  # the one "off"; 0 is not a second one
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        LossOptions(logit_softcap=0.0)


def test_backward_returns_gradients_by_input_name():
    from fused_loss.op import _input_grads
    op = torch.ops.fused_loss.lce_rows_backward.default
    assert _input_grads(op, weight="dW", hidden="dh") == ("dh", "dW", None, None, None, None)
    with pytest.raises(TypeError, match="no tensor inputs named .*ignore_index"):
        _input_grads(op, ignore_index=0)


def _grads_bf16(hidden, weight, labels, reduction, backend=None, divisor=None, **kw):
    """(dh, dW) of bf16 inputs for the loss (divided by `divisor` before its backward, as
    torchtitan divides its sum): the fused op with `backend`, else eager (logits materialized,
    cross-entropy in fp32 as torchtitan computes it)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if backend is None:
        loss = F.cross_entropy((h @ w.t()).float(), labels, reduction=reduction)
    else:
        loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, backend=backend, **kw)
    (loss if divisor is None else loss / divisor).backward()
    return h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [None, 64])  # one chunk (16-bit dW), 5 (fp32 carry)
def test_known_upstream_gradient_is_folded_in_as_eager_folds_it(chunk_size):
    # "mean" (1/300) and torchtitan's sum / global tokens (grad_scale 1/300): the gradient rows
    # are scaled in the row pass, as eager's backward scales them, so dh and dW are rounded
    # once: as accurate as eager. Unannounced, a one-chunk 16-bit dW is rounded again by the
    # backward's scale pass.
    n, d, v = 300, 64, 8000  # 300: no power of two
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)
    divisor = torch.tensor(float(n))
    for reduction, announce in (("mean", {}), ("sum", dict(grad_scale=torch.ones(()) / divisor))):
        upstream = None if reduction == "mean" else divisor
        want = reference_loss(hidden, weight, labels, reduction="mean")
        eager = [rel_err(a, b) for a, b in zip(_grads_bf16(hidden, weight, labels, reduction,
                                                          divisor=upstream), want[1:])]
        ours = [rel_err(a, b) for a, b in zip(
            _grads_bf16(hidden, weight, labels, reduction, "torch", divisor=upstream,
                        chunk_size=chunk_size, **announce), want[1:])]
        assert ours[0] <= 1.01 * eager[0] and ours[1] <= 1.01 * eager[1], (reduction, ours, eager)


def test_announced_gradient_leaves_the_forward_final():
    # as announced, the backward's factor is exactly 1: the gradients the forward computed
    # (dh already in the inputs' dtype) are the ones autograd hands back, bit for bit
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g).bfloat16()
    weight = torch.randn(101, 16, generator=g).bfloat16()
    labels = torch.randint(0, 101, (37,), generator=g)
    scale = torch.ones(()) / torch.tensor(37.0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (fused_linear_cross_entropy(h, w, labels, backend="torch", grad_scale=scale) * scale).backward()
    _, _, dh, dw, *_ = torch.ops.fused_loss.lce_sum(
        hidden, weight, labels, None, None, scale, **LossOptions(vocab_size=101).to_op_args(),
        group_name="", backend="torch", chunk=37, want_grad=True, carry_fp32=False,
        check_labels=False)
    assert dh.dtype == torch.bfloat16 and torch.equal(h.grad, dh) and torch.equal(w.grad, dw)


def test_an_upstream_other_than_announced_is_still_applied():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64).float()
    weight = torch.randn(300, 16, generator=g, dtype=torch.float64).float()
    labels = torch.randint(0, 300, (50,), generator=g)
    want = reference_loss(hidden, weight, labels, reduction="sum")
    for reduction, real in (("sum", 3.0), ("mean", 0.5)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_linear_cross_entropy(h, w, labels, backend="torch", reduction=reduction,
                                          grad_scale=0.25, chunk_size=16)
        (loss * real).backward()  # announced 0.25
        per_token = real / (50 if reduction == "mean" else 1)
        assert rel_err(h.grad, want[1] * per_token) < 1e-5
        assert rel_err(w.grad, want[2] * per_token) < 1e-5


@pytest.mark.parametrize("bad, match", [
    (0.0, "finite and non-zero"), (float("nan"), "finite and non-zero"), ("1", "float or a tensor"),
    (torch.ones(2), "one-element floating point"), (torch.tensor(3), "one-element floating point")])
def test_bad_grad_scale_is_refused(bad, match):
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(h, w, y, grad_scale=bad)
    with pytest.raises(ValueError, match="reduction 'sum' or 'mean'"):
        fused_linear_cross_entropy(h, w, y, reduction="none", grad_scale=1.0)
