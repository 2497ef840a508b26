"""Per-token outputs (token_stats): the softmax entropy, the predicted token and whether it is
right: against an fp64 reference on CPU (the torch backend, and Triton in its interpreter), then
on a GPU at real sizes (the `gpu` marker: pytest -m gpu)."""

import pytest
import torch
import torch.distributed as dist

from fused_loss import fused_linear_cross_entropy

from benchmarks.reference import rel_err
from fused_ce_reference import assert_predicted, reference_token_stats
from test_fused_loss import BACKENDS, OPTION_SETS, _inputs
from test_fused_loss_gpu import _inputs as _gpu_inputs, on_gpu, on_two_ranks


# ---- per-token outputs (token_stats): entropy, predicted token, correct ----

def _with_aux(hidden, weight, labels, upstream=None, **kw):
    """(loss, dh, dW, aux) of one run with return_aux."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, aux = fused_linear_cross_entropy(h, w, labels, return_aux=True, **kw)
    (loss * upstream if upstream is not None else loss).sum().backward()
    return loss.detach(), h.grad, w.grad, aux


def _check_token_stats(aux, hidden, weight, labels, options):
    ignore_index = options.get("ignore_index", -100)
    want_entropy, logits = reference_token_stats(hidden, weight, labels,
                                                 ignore_index=ignore_index,
                                                 logit_softcap=options.get("logit_softcap"))
    assert aux.entropy.dtype == torch.float32 and aux.entropy.shape == labels.shape
    assert aux.predicted.shape == labels.shape and aux.correct.shape == labels.shape
    # entropy <= log V ~ 8: an fp32 absolute floor as for the loss
    torch.testing.assert_close(aux.entropy.double(), want_entropy, rtol=2e-6, atol=2e-6)
    assert bool((aux.entropy[labels == ignore_index] == 0).all())
    assert_predicted(aux.predicted, logits, labels, aux.correct, ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "plain")
def test_token_stats_match_fp64_and_change_nothing_else(backend, reduction, options):
    # two blocks of 4096 on the torch backend; Triton's interpreter: 517 (no block multiple)
    n, v = 23, 4099 if backend == "torch" else 517
    ignore_index = options.get("ignore_index", -100)
    hidden, weight, labels = _inputs(n, 7, v, ignore_index=ignore_index)
    # four labels are the (capped) argmax: `correct` must see them. The four rows whose argmax
    # is clearest (the largest gap to the runner-up: a near-tie under a saturated softcap may
    # round either way) and is not ignore_index (then the token is ignored, never correct)
    logits = reference_token_stats(hidden, weight, labels,
                                   logit_softcap=options.get("logit_softcap"))[1]
    top2 = logits.topk(2, dim=1)
    gap = (top2.values[:, 0] - top2.values[:, 1]).masked_fill(
        top2.indices[:, 0] == ignore_index, -1.0)
    clear = gap.argsort(descending=True)[:4]
    labels[clear] = top2.indices[clear, 0]
    upstream = torch.rand(n) if reduction == "none" else None
    kw = dict(reduction=reduction, backend=backend, chunk_size=5, **options)
    *got, aux = _with_aux(hidden, weight, labels, upstream, token_stats=True, **kw)
    _check_token_stats(aux, hidden, weight, labels, options)
    assert bool(aux.correct[clear].all())
    # the loss, its gradients and the other statistics are those of the run without them,
    # bit for bit; without token_stats the fields are None
    *plain, plain_aux = _with_aux(hidden, weight, labels, upstream, **kw)
    for a, b in zip(got + list(aux[:3]), plain + list(plain_aux[:3])):
        assert torch.equal(a, b)
    assert plain_aux.entropy is None and plain_aux.predicted is None and plain_aux.correct is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_token_stats_one_token_and_all_ignored(backend, reduction):
    hidden, weight, labels = _inputs(1, 5, 300, ignore_frac=0.0)
    _, _, _, aux = _with_aux(hidden, weight, labels, reduction=reduction, backend=backend,
                             token_stats=True, upstream=torch.ones(1) if reduction == "none"
                             else None)
    _check_token_stats(aux, hidden, weight, labels, {})
    labels.fill_(-100)
    hidden, weight, labels = _inputs(6, 5, 300, ignore_frac=1.0)
    loss, dh, dw, aux = _with_aux(hidden, weight, labels, reduction=reduction, backend=backend,
                                  token_stats=True, upstream=torch.ones(6) if reduction == "none"
                                  else None)
    _check_token_stats(aux, hidden, weight, labels, {})
    assert bool((aux.entropy == 0).all()) and not bool(aux.correct.any())
    assert torch.all(loss == 0) and torch.all(dh == 0) and torch.all(dw == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_argmax_of_capped_logits_first_of_ties(backend):
    # cap 1 and |z| >= 20: every positive logit caps to exactly 1.0 in fp32, a tie. The raw
    # argmax is the largest weight (row 5000), the capped one the first positive
    # (torch.argmax: first of ties); the entropy is that of the capped logits (log #ties)
    v, first = 5003, 99  # the ties span two of Triton's 4096-wide blocks
    weight = -torch.ones(v, 1)
    weight[first::7] = 1.0
    weight[v - 3] = 2.0  # the raw argmax
    hidden = torch.full((3, 1), 20.0)
    labels = torch.tensor([first, v - 3, -100])
    _, _, _, aux = _with_aux(hidden, weight, labels, backend=backend, logit_softcap=1.0,
                             token_stats=True)
    assert aux.predicted.tolist() == [first] * 3
    assert aux.correct.tolist() == [True, False, False]
    want_entropy, _ = reference_token_stats(hidden, weight, labels, logit_softcap=1.0)
    torch.testing.assert_close(aux.entropy.double(), want_entropy, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"logit_softcap": 3.0}], ids=["plain", "softcap"])
def test_token_stats_across_blocks(backend, options):
    # V = 9001: three of Triton's 4096-wide blocks, the max moving between them (the sum of
    # e^(y-m) (y-m) is rescaled when it does); rows whose max is in the first, second, last
    v = 9001
    hidden, weight, labels = _inputs(6, 4, v, ignore_frac=0.0)
    weight *= 0.3
    for row, col in enumerate((5, 4100, 9000, 4095, 8191, 8192)):
        weight[col] = 5 * hidden[row] / hidden[row].norm()  # its row's largest logit, by far
    for reduction in ("sum", "none"):  # Triton: statistics with / without the gradient pass
        _, _, _, aux = _with_aux(hidden, weight, labels, reduction=reduction, backend=backend,
                                 token_stats=True, upstream=torch.ones(6)
                                 if reduction == "none" else None, **options)
        _check_token_stats(aux, hidden, weight, labels, options)
        assert aux.predicted.tolist() == [5, 4100, 9000, 4095, 8191, 8192]


@pytest.mark.parametrize("bad, match", [
    (dict(token_stats=True), "token_stats=True needs return_aux=True"),
    (dict(token_stats=1, return_aux=True), "token_stats must be True or False"),
])
def test_token_stats_bad_values_name_the_option(bad, match):
    hidden, weight, labels = _inputs(4, 3, 20)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(hidden, weight, labels, **bad)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_token_stats_through_torch_compile(reduction):
    hidden, weight, labels = _inputs(16, 8, 64)

    def step(h, w, y):
        loss, aux = fused_linear_cross_entropy(h, w, y, reduction=reduction, return_aux=True,
                                               token_stats=True, logit_softcap=5.0)
        return loss.sum(), aux.entropy, aux.predicted, aux.correct

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    w = weight.clone().requires_grad_()
    loss, entropy, predicted, correct = compiled(hidden, w, labels)
    loss.backward()
    eager = _with_aux(hidden, weight, labels, reduction=reduction, token_stats=True,
                      logit_softcap=5.0)
    want = eager[3]
    assert torch.equal(entropy, want.entropy) and torch.equal(predicted, want.predicted)
    assert torch.equal(correct, want.correct)
    torch.testing.assert_close(w.grad, eager[2])


# ---- on a GPU ----

# ---- per-token outputs (token_stats): entropy, predicted token, correct ----

def _aux_run(hidden, weight, labels, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, aux = fused_linear_cross_entropy(h, w, labels, return_aux=True, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, aux


def _check_tokens_fp64(hidden, weight, labels, aux, *, softcap=None, logits_dtype=None,
                       entropy_tol, slack, rows=1024):
    """entropy against fp64 (of the logits rounded to `logits_dtype` as the kernel's GEMM
    writes them, when given), predicted an argmax up to `slack` (relative), correct exact."""
    w64 = weight.double()
    for i in range(0, hidden.shape[0], rows):
        h, y = hidden[i:i + rows], labels[i:i + rows]
        z = (h @ weight.t()).double() if logits_dtype is not None else h.double() @ w64.t()
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        valid = y != -100
        entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1) * valid
        torch.testing.assert_close(aux.entropy[i:i + rows].double(), entropy, rtol=0,
                                   atol=entropy_tol)
        pred = aux.predicted[i:i + rows]
        top = z.max(1).values
        picked = z.gather(1, pred[:, None]).squeeze(1)
        assert bool((top - picked <= slack * top.abs().clamp(min=1)).all()), (top - picked).max()
        assert torch.equal(aux.correct[i:i + rows], (pred == y) & valid)


@on_gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_token_stats_fp32_against_fp64(softcap):
    hidden, weight, labels = _gpu_inputs(2048, 512, 128257, torch.float32, seed=11)
    hidden = hidden * 4  # peaked rows too (entropy near 0) besides flat ones
    labels[:64] = (hidden[:64] @ weight.t()).argmax(1)
    *_, aux = _aux_run(hidden, weight, labels, logit_softcap=softcap, token_stats=True)
    _check_tokens_fp64(hidden, weight, labels, aux, softcap=softcap, entropy_tol=1e-4,
                       slack=1e-5)
    assert aux.correct[:64].float().mean() > 0.9


@on_gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_token_stats_bf16_8b_head(reduction):
    # statistics pass with the gradient in one launch ("sum") and alone ("none")
    hidden, weight, labels = _gpu_inputs(4096, 4096, 128256, torch.bfloat16, seed=12)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, aux = fused_linear_cross_entropy(h, w, labels, return_aux=True, token_stats=True,
                                           reduction=reduction)
    loss.sum().backward()
    # bf16 logits tie often: the pick is within one bf16 ulp of the max
    _check_tokens_fp64(hidden, weight, labels, aux, logits_dtype=torch.bfloat16,
                       entropy_tol=1e-4, slack=2 ** -7)


@on_gpu
def test_token_stats_change_nothing_else():
    # with token_stats the loss, lse, dh and dW are those without, bit for bit
    hidden, weight, labels = _gpu_inputs(4096, 2048, 32000, torch.bfloat16, seed=13)
    for kw in ({}, {"logit_softcap": 30.0, "label_smoothing": 0.1}):
        *on, aux_on = _aux_run(hidden, weight, labels, token_stats=True, chunk_size=1536, **kw)
        *off, aux_off = _aux_run(hidden, weight, labels, chunk_size=1536, **kw)
        for a, b in zip(on + [aux_on.lse], off + [aux_off.lse]):
            assert torch.equal(a, b)
        assert aux_off.entropy is None


@on_gpu
def test_token_stats_first_of_capped_ties_across_blocks():
    # cap 1, |z| = 20: libdevice's tanh is exactly 1.0 there, every positive logit ties;
    # the first is in the first 4096-wide block, the raw argmax (2.0) in the second
    v = 5003
    weight = -torch.ones(v, 1, device="cuda")
    weight[99::7] = 1.0
    weight[5000] = 2.0
    hidden = torch.full((3, 1), 20.0, device="cuda")
    labels = torch.tensor([99, 5000, -100], device="cuda")
    for reduction in ("sum", "none"):
        loss, aux = fused_linear_cross_entropy(hidden, weight, labels, logit_softcap=1.0,
                                               return_aux=True, token_stats=True,
                                               reduction=reduction)
        assert aux.predicted.tolist() == [99, 99, 99]
        assert aux.correct.tolist() == [True, False, False]


@on_gpu
def test_token_stats_no_host_sync():
    hidden, weight, labels = _gpu_inputs(2048, 512, 32000, torch.bfloat16, seed=14)
    w = weight.clone().requires_grad_()
    kw = dict(check_labels=False, return_aux=True, token_stats=True)
    fused_linear_cross_entropy(hidden, w, labels, **kw)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, aux = fused_linear_cross_entropy(hidden, w, labels, **kw)
        loss.backward()
        aux.correct.sum() + aux.entropy.sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@on_gpu
def test_token_stats_compiled_with_inductor():
    hidden, weight, labels = _gpu_inputs(1024, 512, 32000, torch.bfloat16, seed=15)

    def step(h, w, y):
        loss, aux = fused_linear_cross_entropy(h, w, y, return_aux=True, token_stats=True)
        return loss, aux.entropy.sum(), aux.correct.sum(), aux.predicted

    compiled = torch.compile(step, fullgraph=True)
    eager, comp = step(hidden, weight, labels), compiled(hidden, weight, labels)
    torch.testing.assert_close(comp[0], eager[0])
    torch.testing.assert_close(comp[1], eager[1])
    assert torch.equal(comp[2], eager[2]) and torch.equal(comp[3], eager[3])


def _vp_token_worker(rank, hidden, weight, labels):
    v = weight.shape[0]
    split = (v + 1) // 2
    # rank 0 holds the upper half: the first of tied maxima is then rank 1's
    start = split if rank == 0 else 0
    local = weight[split:] if rank == 0 else weight[:split]
    loss, aux = fused_linear_cross_entropy(hidden, local, labels, vocab_start=start,
                                           vocab_size=v, process_group=dist.group.WORLD,
                                           backend="triton", logit_softcap=1.0,
                                           return_aux=True, token_stats=True, reduction="none")
    return loss, aux.entropy, aux.predicted, aux.correct


@on_gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_vocab_parallel_token_stats_over_nccl():
    hidden, weight, labels = _gpu_inputs(4096, 1024, 128257, torch.float32, seed=17)
    hidden = hidden * 4  # with cap 1 many logits are exactly 1.0: ties across the ranks
    loss, single = fused_linear_cross_entropy(hidden, weight, labels, logit_softcap=1.0,
                                              return_aux=True, token_stats=True,
                                              reduction="none")
    ranks = on_two_ranks(_vp_token_worker, hidden, weight, labels)
    for r_loss, entropy, predicted, correct in ranks:
        assert rel_err(r_loss, loss.cpu()) < 1e-5
        torch.testing.assert_close(entropy, single.entropy.cpu(), rtol=1e-5, atol=1e-5)
        assert torch.equal(predicted, single.predicted.cpu())
        assert torch.equal(correct, single.correct.cpu())
