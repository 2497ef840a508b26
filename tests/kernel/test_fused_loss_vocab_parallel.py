"""Vocabulary parallel over 2 gloo processes equals one process, for loss and all gradients.

All cases run in ONE pair of spawned processes (a spawn costs seconds of imports); each test
then checks its case's results.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_loss import fused_linear_cross_entropy

from benchmarks.reference import reference_loss, rel_err
from fused_ce_reference import assert_predicted, reference_token_stats

WORLD = 2

# a layout is checked once per (group, vocab_size), so each layout has its own vocab_size
EQUAL_CASES = [  # (splits, reduction, options)
    ((50, 50), "sum", {}),
    ((37, 64), "sum", {}),
    ((50, 50), "mean", {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}),
    ((37, 64), "mean", {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}),
    ((37, 64), "none", {"z_loss": 1e-3}),
    # token_stats: entropy and argmax merged in the same all-gather; (64, 38) from (38, 0):
    # rank 0 holds the upper slice, so the first of tied maxima is on rank 1
    ((37, 64), "sum", {"token_stats": True}),
    ((64, 38), "none", {"token_stats": True, "logit_softcap": 1.0, "label_smoothing": 0.1}),
    ((50, 53), "mean", {"token_stats": True, "z_loss": 1e-3}),
    ((64, 40), "sum", {"token_stats": True, "logit_softcap": 1.0, "backend": "triton"}),
    # bias: each rank its slice, like the weight; its gradient is this rank's slice of db
    ((50, 55), "sum", {"bias": True, "logit_softcap": 5.0}),
    ((30, 76), "none", {"bias": True, "z_loss": 1e-3}),
    ((60, 47), "mean", {"bias": True, "token_stats": True, "backend": "triton"}),
    # class_weight: the whole vocabulary's weights on every rank
    ((50, 58), "mean", {"class_weight": True, "z_loss": 1e-3}),
    ((31, 78), "none", {"class_weight": True, "bias": True}),
    ((60, 50), "sum", {"class_weight": True, "backend": "triton", "logit_softcap": 5.0}),
    # shift: the 29 positions are one sequence; labels shifted, hidden states not copied
    ((45, 66), "sum", {"shift": True, "token_stats": True}),
    ((70, 42), "none", {"shift": True, "bias": True, "backend": "triton"}),
    # the chunks planned under a cap (no chunk_size): 4 fp32 rows of the larger slice (34),
    # 5 of the smaller (33); both ranks must run the same chunks, planned on ceil(67 / 2)
    ((34, 33), "sum", {"chunk_budget_bytes": 660}),
    # fp32_statistics in fp16: the Triton epilogue path (interpreter), each rank's tiles merged,
    # then the ranks' statistics in the one all-gather
    ((300, 217), "mean", {"fp32_statistics": True, "backend": "triton", "token_stats": True,
                          "z_loss": 1e-3}),
    ((260, 261), "none", {"fp32_statistics": True, "backend": "triton", "bias": True}),
]
STARTS = {(64, 38): (38, 0), (64, 40): (40, 0)}  # else rank r starts at sum(splits[:r])
TILING_CASES = [  # (splits, starts, expected error), weight of 97 rows
    ((40, 50), (0, 40), r"cover \[0, 90\) but vocab_size is 97"),
    ((40, 57), (0, 50), "do not tile the vocabulary .* gap or overlap at 40"),
    ((60, 37), (0, 50), "do not tile the vocabulary .* gap or overlap at 60"),
    # 100 rows: the 50/50 layout was checked by the first equal case; now both slices moved
    ((40, 60), (0, 40), r"differs from \(\d+, 50\) seen on the first call"),
]


def _one_rank(rank, hidden, weight, labels, upstream, splits, starts, options):
    start = starts[rank]
    h = hidden.clone().requires_grad_()
    w_local = weight[start:start + splits[rank]].clone().requires_grad_()
    options = dict(options)
    b_local = options.pop("bias", None)
    if b_local is not None:
        b_local = b_local[start:start + splits[rank]].clone().requires_grad_()
        options["bias"] = b_local
    aux = None
    try:
        loss = fused_linear_cross_entropy(h, w_local, labels, vocab_start=start,
                                          vocab_size=weight.shape[0],
                                          process_group=dist.group.WORLD,
                                          return_aux=bool(options.get("token_stats")),
                                          **options)
    except ValueError as e:
        return e
    if isinstance(loss, tuple):
        loss, aux = loss
    (loss * upstream if upstream is not None else loss).sum().backward()
    dh = h.grad.clone()
    dist.all_reduce(dh)  # the op returns this rank's partial input gradient
    db = [] if b_local is None else [b_local.grad]
    if aux is not None:
        return loss.detach(), dh, w_local.grad, *db, aux.entropy, aux.predicted, aux.correct
    return loss.detach(), dh, w_local.grad, *db


def _worker(rank, init_file, cases_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        cases = torch.load(cases_file, weights_only=False)
        torch.save([_one_rank(rank, *case) for case in cases], f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()
    # The results are on disk: skip the interpreter teardown, where torch's gloo objects
    # were seen to abort ("terminate called without an active exception") now and then.
    os._exit(0)


def _run_parallel(cases):
    """cases: (hidden, weight, labels, upstream, splits, starts, options) -> per case, per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        cases_file = os.path.join(tmp, "cases.pt")
        torch.save(cases, cases_file)
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), cases_file,
                                os.path.join(tmp, "out")), nprocs=WORLD)
        per_rank = [torch.load(os.path.join(tmp, f"out.{r}"), weights_only=False)
                    for r in range(WORLD)]
    return list(zip(*per_rank))


def _equal_case(splits, reduction, options):
    n, d, v = 29, 8, sum(splits)
    hidden, weight = torch.randn(n, d), torch.randn(v, d)
    labels = torch.randint(0, v, (n,))
    labels[::4] = -100
    upstream = torch.rand(n - bool(options.get("shift"))) if reduction == "none" else None
    options = dict(options, reduction=reduction)
    if options.get("fp32_statistics"):  # 16-bit inputs (their dot is exact in the interpreter)
        hidden, weight = hidden.half(), (weight / 2).half()
    if "chunk_budget_bytes" not in options:
        options["chunk_size"] = 6
    if options.get("logit_softcap") == 1.0:  # |z| >> cap: capped logits tie at 1.0 exactly
        hidden = hidden * 20
    if options.get("bias"):
        options["bias"] = (torch.randn(v) * 2).to(hidden.dtype)
    if options.get("class_weight"):
        options["class_weight"] = torch.rand(v) * 3
    starts = STARTS.get(splits) or [sum(splits[:r]) for r in range(WORLD)]
    return hidden, weight, labels, upstream, splits, starts, options


@pytest.fixture(scope="module")
def parallel_results():
    torch.manual_seed(torch.seed() % 2**31)
    equal = [_equal_case(*c) for c in EQUAL_CASES]
    tiling = [(torch.randn(4, 3), torch.randn(97, 3), torch.randint(0, 40, (4,)), None,
               splits, starts, {}) for splits, starts, _ in TILING_CASES[:3]]
    tiling.append((torch.randn(4, 3), torch.randn(100, 3), torch.randint(0, 40, (4,)), None,
                   *TILING_CASES[3][:2], {}))
    results = _run_parallel(equal + tiling)
    return equal, results[:len(equal)], results[len(equal):]


@pytest.mark.parametrize("index", range(len(EQUAL_CASES)),
                         ids=[f"{c[1]}-{'even' if c[0][0] == c[0][1] else 'uneven'}"
                              f"{'-token_stats' if c[2].get('token_stats') else ''}"
                              f"{'-triton' if c[2].get('backend') == 'triton' else ''}"
                              f"{'-bias' if c[2].get('bias') else ''}"
                              f"{'-class_weight' if c[2].get('class_weight') else ''}"
                              f"{'-shift' if c[2].get('shift') else ''}"
                              f"{'-capped' if c[2].get('chunk_budget_bytes') else ''}"
                              f"{'-fp32_statistics' if c[2].get('fp32_statistics') else ''}"
                              for c in EQUAL_CASES])
def test_two_ranks_equal_one(parallel_results, index):
    cases, results, _ = parallel_results
    hidden, weight, labels, upstream, splits, starts, options = cases[index]
    reduction = options["reduction"]
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    options = dict(options)
    bias = options.get("bias")
    if bias is not None:
        options["bias"] = b = bias.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, **options,
                                      return_aux=bool(options.get("token_stats")))
    if isinstance(loss, tuple):
        loss, aux = loss
    (loss * upstream if upstream is not None else loss).sum().backward()
    if options.get("fp32_statistics"):
        # both runs round the gradient rows to fp16 once, from statistics that agree to fp32
        # (merged over tiles, then over ranks): agreement to a few fp16 ulps
        want_entropy = reference_token_stats(hidden, weight, labels)[0]
        exact = reference_loss(hidden, weight, labels, reduction=reduction, upstream=upstream,
                               bias=bias, z_loss=options.get("z_loss", 0.0))[0]
        assert rel_err(loss, exact) < 1e-6  # the statistics of the fp32 product, not fp16 logits
        for rank, (r_loss, r_dh, r_dw, *tokens) in enumerate(results[index]):
            assert rel_err(r_loss, loss) < 1e-6
            assert rel_err(r_dh, h.grad) < 2e-3
            assert rel_err(r_dw, w.grad[starts[rank]:starts[rank] + splits[rank]]) < 2e-3
            if tokens and options.get("token_stats"):
                torch.testing.assert_close(tokens[0].double(), want_entropy, rtol=1e-5,
                                           atol=1e-5)
                assert torch.equal(tokens[1], aux.predicted)
        return
    if (bias is not None or "class_weight" in options) and not options.get("shift"):
        # the one process against fp64 (test_fused_loss checks shift against it)
        want = reference_loss(hidden, weight, labels, reduction=reduction, upstream=upstream,
                              bias=bias, **{k: v for k, v in options.items()
                                            if k in ("logit_softcap", "z_loss", "class_weight")})
        got = (loss, h.grad, w.grad) + ((b.grad,) if bias is not None else ())
        for got, exact in zip(got, want):
            assert rel_err(got, exact) < 1e-5
    for rank, (r_loss, r_dh, r_dw, *tokens) in enumerate(results[index]):
        _assert_close_to_scale(r_loss, loss.detach())
        _assert_close_to_scale(r_dh, h.grad)
        _assert_close_to_scale(r_dw, w.grad[starts[rank]:starts[rank] + splits[rank]])
        if bias is not None:
            r_db, *tokens = tokens
            assert r_db.shape == (splits[rank],)
            _assert_close_to_scale(r_db, b.grad[starts[rank]:starts[rank] + splits[rank]])
        assert len(tokens) == (3 if options.get("token_stats") else 0)
        if tokens and options.get("shift"):  # test_fused_loss checks shift against fp64
            assert torch.equal(tokens[1], aux.predicted)
            torch.testing.assert_close(tokens[0], aux.entropy, rtol=1e-6, atol=1e-6)
            assert torch.equal(tokens[2], aux.correct)
        elif tokens:  # against fp64, and the one-process argmax exactly (ties: the first)
            entropy, predicted, correct = tokens
            want_entropy, logits = reference_token_stats(
                hidden, weight, labels, logit_softcap=options.get("logit_softcap"))
            if bias is not None:
                want_entropy, logits = _biased_token_stats(hidden, weight, bias, labels)
            torch.testing.assert_close(entropy.double(), want_entropy, rtol=2e-6, atol=2e-6)
            assert_predicted(predicted, logits, labels, correct)
            assert torch.equal(predicted, aux.predicted)
            torch.testing.assert_close(entropy, aux.entropy, rtol=1e-6, atol=1e-6)


def _biased_token_stats(hidden, weight, bias, labels):
    z = hidden.double() @ weight.double().t() + bias.double()
    entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
    return torch.where(labels != -100, entropy, 0.0), z


def _assert_close_to_scale(actual, expected):
    """fp32 agreement relative to the tensor's scale, not to each element: the parallel input
    gradient is a sum of per-rank partial GEMMs and a token's loss is lse - target, so an
    element that cancels to near zero carries the rounding of its (larger) terms. A missing or
    doubled rank contribution is off by O(scale) and still fails."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-6))


@pytest.mark.parametrize("index", range(len(TILING_CASES)))
def test_slices_that_do_not_tile_are_refused(parallel_results, index):
    match = TILING_CASES[index][2]
    for result in parallel_results[2][index]:
        assert isinstance(result, ValueError), result
        with pytest.raises(ValueError, match=match):
            raise result
