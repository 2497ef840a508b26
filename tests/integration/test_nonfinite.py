"""Non-finite hidden states (an unstable step): the fused loss is non-finite exactly where eager
PyTorch's is, per token - no crash, no silent zero - so torchtitan's own handling (a non-finite
loss and grad norm in the log) applies as it would without the fused head.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fused_loss import fused_linear_cross_entropy
from parallel.config import FusedCE
from parallel.fused_head import FusedLMHead
from parallel.metrics import LSE_MEAN_TAG
from test_metrics import RecordingLogger

BACKENDS = ["torch", "triton"]  # triton: the interpreter on CPU (fp32)
N, D, V = 9, 16, 40


def _unstable_batch():
    """Hidden states of one step gone wrong, one kind per token; token 0 and 7 stay sane."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    hidden[1, 3] = math.nan
    hidden[2, 0] = math.inf
    hidden[3, 5] = -math.inf
    hidden[4] = 1e30  # finite, but its logits are not small: a loss of about 1e30
    hidden[5] = 3e38  # finite, its logits overflow fp32
    hidden[6, 0], labels[6] = math.nan, -100  # ignored: contributes nothing, NaN or not
    hidden[8, 2] = math.nan
    return hidden, weight, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_loss_is_non_finite_where_eagers_is(backend, dtype):
    """Also from 16-bit inputs, whose statistics the kernels take their own way (in fp16,
    token 4's hidden state is inf already)."""
    hidden, weight, labels = (t.to(dtype) if t.is_floating_point() else t for t in _unstable_batch())
    eager = F.cross_entropy(hidden.float() @ weight.float().T, labels, reduction="none")
    fused = fused_linear_cross_entropy(hidden, weight, labels, reduction="none", backend=backend,
                                       chunk_size=4)
    finite = torch.isfinite(eager)
    assert finite.tolist() == [True, False, False, False, dtype != torch.float16, False, True, True,
                               False]
    assert torch.isfinite(fused).tolist() == finite.tolist()
    assert fused[6] == 0  # the ignored token
    if dtype == torch.float32:
        torch.testing.assert_close(fused[finite], eager[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_loss_and_gradients_are_non_finite_not_a_crash(backend, reduction):
    hidden, weight, labels = _unstable_batch()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, backend=backend, chunk_size=4)
    loss.backward()
    assert not torch.isfinite(loss)
    assert not torch.isfinite(w.grad).all()  # dW takes every token: an optimizer step sees it
    # dh per token: the sane tokens stay finite, the broken ones do not; the ignored token's is
    # 0 (eager gives NaN there: softmax's backward multiplies its NaN row by a zero gradient).
    assert torch.isfinite(h.grad).all(-1).tolist() == [True, False, False, False, True, False,
                                                       True, True, False]
    assert torch.all(h.grad[6] == 0)

    # without the broken tokens the same call is finite: nothing else was disturbed
    sane = [0, 4, 7]
    clean = fused_linear_cross_entropy(hidden[sane], weight, labels[sane], reduction=reduction,
                                       backend=backend, chunk_size=4)
    assert torch.isfinite(clean)


def test_fused_head_loss_and_stats_are_nan_like_eagers():
    """The trainer's path: FusedLMHead's sum loss, and the fused_ce/* statistics it logs, carry
    the NaN of one bad token; a later clean step logs finite statistics again."""
    hidden, weight, labels = _unstable_batch()
    linear = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    eager = F.cross_entropy(linear(hidden[:2]), labels[:2], reduction="sum")
    head = FusedLMHead(linear, FusedCE(enable=True, backend="torch"))
    head.train()
    loss = head(hidden[:2], labels=labels[:2])  # token 1 has a NaN
    loss.backward()
    assert math.isnan(eager.item()) and math.isnan(loss.item())
    logged = head.stats.flush(RecordingLogger(), 1)
    assert math.isnan(logged[LSE_MEAN_TAG])

    head(hidden[:1], labels=labels[:1]).backward()
    assert math.isfinite(head.stats.flush(RecordingLogger(), 2)[LSE_MEAN_TAG])
