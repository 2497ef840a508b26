"""The chunk plan (fused_loss/plan.py): the measured shapes get the plans the measurements call
for, the cap and an explicit chunk_size are obeyed, the op runs the plan (rows and the fp32 dW
carry) with the right outputs, and every rank of a group plans alike."""

import pytest
import torch
import torch.nn.functional as F

import fused_loss.chunked
from fused_loss import fused_linear_cross_entropy
from fused_loss.plan import HBM_BYTES_PER_S, ChunkPlan, group_v_local, plan_chunks

from benchmarks.reference import reference_loss, rel_err

GIB = 2**30

# (N, D, V) -> (rows, chunks, fp32 carry), bf16 with the default 1 GiB cap, measured on an H200
# (the chunk-plan run): 4096/3840/262144 one chunk 39.82 ms / 2.00 GiB against 2 chunks + carry 42.14 /
# 3.75; 8192/4096/128256 one chunk 39.48 / 1.96 against 41.07 / 1.96 (equal memory: the rows a
# chunk saves are the carry's D); 8192/2304/256000 one chunk holds 3.91 GiB against 2.20
MEASURED = [
    ((4096, 3840, 262144), (4096, 1, False)),
    ((8192, 4096, 128256), (8192, 1, False)),
    ((8192, 2304, 256000), (2048, 4, True)),
    ((32768, 4096, 128256), (4096, 8, True)),
]


@pytest.mark.parametrize("shape, expected", MEASURED, ids=lambda x: "x".join(map(str, x)))
def test_measured_shapes_get_the_cheaper_plan(shape, expected):
    plan = plan_chunks(*shape, 2)
    assert (plan.rows, plan.n_chunks, plan.carry_fp32) == expected
    n, d, v = shape
    capped = plan_chunks(n, d, v, 2, chunk_size=_capped_rows(n, v))
    assert plan.workspace_bytes <= capped.workspace_bytes
    assert plan.predicted_ms <= capped.predicted_ms


def _capped_rows(n, v, element_size=2, cap=GIB):
    """The balanced, 128-rounded rows of the fewest chunks whose logits fit `cap`."""
    most = cap // (v * element_size)
    chunks = -(-n // most)
    rows = -(-n // chunks)
    rounded = -(-rows // 128) * 128
    return n if chunks == 1 else rounded if rounded <= most else rows


def test_predictions_of_the_measured_shapes():
    # the model's time within ~5% and its memory within ~0.1 GiB of the H200's measurements
    measured = {(4096, 3840, 262144): (39.82, 2.00), (8192, 4096, 128256): (39.48, 1.96),
                (8192, 2304, 256000): (49.56, 2.20), (32768, 4096, 128256): (160.85, 2.21),
                # the sweep at 6a733d5: the carry's backward moment (V*D*4) is the peak here
                (8192, 4096, 151936): (49.61, 2.32), (8192, 4096, 262144): (86.41, 4.00),
                (16384, 4096, 128256): (80.91, 2.08)}
    for shape, (ms, gib) in measured.items():
        plan = plan_chunks(*shape, 2)
        assert abs(plan.predicted_ms / ms - 1) < 0.05, (shape, plan)
        assert abs(plan.workspace_bytes / GIB - gib) < 0.1, (shape, plan)


def test_an_announced_upstream_gradient_skips_the_in_place_scale_passes():
    # with grad_scale the backward's factor is exactly 1: the in-place passes over the 16-bit
    # dW and dh cost nothing; the fp32 carry is still read and rounded into dW
    n, d, v = 8192, 4096, 128256
    ms_per_byte = 1e3 / HBM_BYTES_PER_S
    told, untold = plan_chunks(n, d, v, 2, dh_fp32=False), plan_chunks(n, d, v, 2)
    assert told.n_chunks == untold.n_chunks == 1
    assert told.predicted_ms == pytest.approx(
        untold.predicted_ms - (v * d * (2 + 2) + n * d * (4 + 2)) * ms_per_byte)
    told, untold = (plan_chunks(n, d, v, 2, dh_fp32=False, chunk_size=2048),
                    plan_chunks(n, d, v, 2, chunk_size=2048))
    assert told.carry_fp32 and untold.carry_fp32
    assert told.predicted_ms == pytest.approx(untold.predicted_ms - n * d * (4 + 2) * ms_per_byte)


@pytest.mark.parametrize("shape, rows", [((4096, 3840, 262144), 2048),
                                         ((8192, 4096, 128256), 4096),
                                         ((8192, 2304, 256000), 2048),
                                         ((32768, 4096, 128256), 4096)])
def test_without_the_fp32_carry_the_fewest_chunks_under_the_cap(shape, rows):
    n, _, v = shape
    plan = plan_chunks(*shape, 2, weight_grad_fp32=False)
    assert (plan.rows, plan.carry_fp32) == (rows, False)
    assert plan.rows * v * 2 <= GIB  # one chunk costs more memory here: never chosen
    assert plan.n_chunks == -(-n // rows)


def test_the_plan_holds_no_more_than_the_capped_plan_in_the_fewest_chunks():
    # every plan of a grid: no more workspace and no more predicted time than the capped plan
    # (the fewest chunks whose logits fit the cap), and no plan of fewer chunks is within both
    # bounds; its logits exceed the cap only where that holds no more memory in all
    kinds = {"capped": 0, "one chunk": 0, "larger chunks": 0}
    for n in (512, 1000, 4096):
        for d in (64, 512, 2048):
            for v in (1000, 5000):
                for cap in (64 * v * 2, 300 * v * 2, 1000 * v * 2):
                    for dh_fp32 in (True, False):
                        kw = dict(dh_fp32=dh_fp32)
                        plan = plan_chunks(n, d, v, 2, chunk_budget_bytes=cap, **kw)
                        capped = plan_chunks(n, d, v, 2, chunk_size=_capped_rows(n, v, cap=cap),
                                             **kw)
                        assert plan.workspace_bytes <= capped.workspace_bytes
                        assert plan.predicted_ms <= capped.predicted_ms
                        for k in range(1, plan.n_chunks):
                            fewer = plan_chunks(n, d, v, 2, chunk_size=-(-n // k), **kw)
                            assert not (fewer.workspace_bytes <= capped.workspace_bytes
                                        and fewer.predicted_ms <= capped.predicted_ms), (
                                n, d, v, cap, k)
                        kinds["capped" if plan == capped else "one chunk" if plan.n_chunks == 1
                              else "larger chunks"] += 1
    assert all(kinds.values()), kinds  # the grid reaches each kind of plan


def test_chunks_grow_to_the_carrys_moment_at_no_memory():
    # 16384 x 5120 x 202048 (a Llama-4-sized head): 1 GiB holds 2432 rows (7 chunks), but the
    # backward holds the fp32 carry (V*D*4 = 3.85 GiB) beside dW anyway; 4096-row chunks fill
    # the forward to no more than that: 4 chunks, 3 re-reads of the carry fewer
    n, d, v = 16384, 5120, 202048
    capped = plan_chunks(n, d, v, 2, chunk_size=_capped_rows(n, v), dh_fp32=False)
    plan = plan_chunks(n, d, v, 2, dh_fp32=False)
    assert (capped.rows, capped.n_chunks) == (2432, 7)
    assert (plan.rows, plan.n_chunks, plan.carry_fp32) == (4096, 4, True)
    assert plan.workspace_bytes == capped.workspace_bytes == v * d * 4
    assert plan.predicted_ms < capped.predicted_ms - 3 * 8 * v * d / HBM_BYTES_PER_S * 1e3 * 0.99


def test_explicit_chunk_size_is_obeyed_and_predicted():
    plan = plan_chunks(4096, 3840, 262144, 2, chunk_size=1024)
    assert (plan.rows, plan.n_chunks, plan.carry_fp32) == (1024, 4, True)
    one = plan_chunks(4096, 3840, 262144, 2)
    assert plan.predicted_ms > one.predicted_ms  # 3 extra chunks re-read the fp32 carry
    # the larger moment: the forward's buffer + carry net + fp32 dh net (2.56 GiB), or the
    # backward's carry beside the dW it is rounded into (3.75 GiB)
    assert plan.workspace_bytes == max(1024 * 262144 * 2 + 262144 * 3840 * 2 + 4096 * 3840 * 2,
                                       262144 * 3840 * 4)
    assert plan_chunks(10, 8, 100, 2, chunk_size=64).rows == 10
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        plan_chunks(10, 8, 100, 2, chunk_size=0)
    with pytest.raises(ValueError, match=r"chunk_budget_bytes=399 is smaller than one row of "
                                         r"logits \(100 x 4 B = 400 B\)"):
        plan_chunks(10, 8, 100, 4, chunk_budget_bytes=399)


def test_no_carry_without_a_gradient_or_with_an_fp32_weight():
    for kw in (dict(want_grad=False), dict(weight_is_fp32=True)):
        plan = plan_chunks(8192, 2304, 256000, 2, **kw)
        assert (plan.rows, plan.carry_fp32) == (2048, False)
    assert isinstance(plan, ChunkPlan)
    with pytest.raises(AttributeError):  # frozen
        plan.rows = 1


def test_every_rank_of_a_group_plans_alike():
    # an uneven split (TP=2 of 11 rows: 6 + 5) plans on the largest slice; a rank's own slice
    # would give the ranks different chunk counts, and so a mismatched collective
    assert group_v_local(6, 11, 2) == group_v_local(5, 11, 2) == 6
    assert group_v_local(5, 11, 1) == 5
    cap = 5 * 5 * 4  # 5 fp32 rows of a 5-row slice, 4 of a 6-row one
    own = [plan_chunks(29, 1, v, 4, chunk_budget_bytes=cap) for v in (6, 5)]
    assert own[0].n_chunks != own[1].n_chunks  # why the slice size must be the group's
    planned = [plan_chunks(29, 1, group_v_local(v, 11, 2), 4, chunk_budget_bytes=cap)
               for v in (6, 5)]
    assert planned[0] == planned[1] and planned[0].rows == 4


@pytest.fixture
def runs(monkeypatch):
    """The (chunk, carry_fp32, dW dtype) of each chunked.run the op makes for a gradient (the
    sum op's forward, or the recompute of reduction="none")."""
    seen, run = [], fused_loss.chunked.run

    def spy(*args, **kwargs):
        out = run(*args, **kwargs)
        if kwargs["want_grad"]:
            dw = out[1] if kwargs.get("lse_in") is not None else out[3]
            seen.append((kwargs["chunk"], kwargs["carry_fp32"], dw.dtype))
        return out

    monkeypatch.setattr(fused_loss.chunked, "run", spy)
    return seen


# (N, D, V, cap, weight_grad_fp32) -> the plan the op must run: (rows, fp32 carry)
OP_PLANS = [
    ((256, 16, 1000, 128 * 1000 * 2, True), (128, True)),  # capped: 2 chunks + carry
    ((256, 256, 1000, 128 * 1000 * 2, True), (256, False)),  # one chunk, above the cap
    ((256, 16, 1000, 128 * 1000 * 2, False), (128, False)),  # capped, 16-bit carry
]


@pytest.mark.parametrize("case, plan", OP_PLANS, ids=["carry", "one-chunk", "bf16-carry"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_the_op_runs_its_plan_with_right_outputs(runs, case, plan, reduction):
    n, d, v, cap, fp32_carry = case
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    upstream = torch.rand(n, generator=g) if reduction == "none" else None
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, backend="torch",
                                      chunk_budget_bytes=cap, weight_grad_fp32=fp32_carry)
    (loss * upstream if upstream is not None else loss).sum().backward()
    rows, carry = plan
    planned = plan_chunks(n, d, v, 2, weight_grad_fp32=fp32_carry, chunk_budget_bytes=cap)
    assert (planned.rows, planned.carry_fp32) == plan
    expected = (rows, carry, torch.float32 if carry else torch.bfloat16)
    assert runs == [expected]  # the sum op's forward, or the recompute of "none"
    assert (loss.dtype, h.grad.dtype, w.grad.dtype) == (torch.float32, torch.bfloat16,
                                                        torch.bfloat16)
    want = reference_loss(hidden, weight, labels, reduction=reduction, upstream=upstream)
    # eager bf16 (the logits rounded to bf16, as the op's) against the same fp64 reference
    he, we = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = F.cross_entropy((he @ we.t()).float(), labels, reduction=reduction)
    (eager * upstream if upstream is not None else eager).sum().backward()
    # no less accurate than eager, but for a 16-bit dW rounded once per chunk
    assert rel_err(loss, want[0]) <= 1.01 * rel_err(eager, want[0]) + 1e-6
    for name, got, ref, eager_grad in (("dh", h.grad, want[1], he.grad),
                                       ("dW", w.grad, want[2], we.grad)):
        rounded_per_chunk = name == "dW" and rows < n and not carry
        limit = (1.2 if rounded_per_chunk else 1.01) * rel_err(eager_grad, ref) + 1e-6
        assert rel_err(got, ref) <= limit, name
