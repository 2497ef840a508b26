"""FusedLMHead under torchtitan's TP plan for `output`, on 2 gloo ranks, with an
uneven vocabulary split (11 rows: 6 + 5), against a single-process reference; with one
sequence per rank too (the all-gathered hidden states then arrive un-waited); and with the loss
divided by an announced count, as FusedCETrainer runs it (the op folds 1/count in)."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

V, D, S = 11, 8, 4


def _reference(B: int):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    hidden = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 1] = -100
    return weight, hidden, labels


def _rank(rank: int, init_file: str, out: dict, B: int, divisor: float | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from parallel.config import FusedCE
    from parallel.fused_head import FusedLMHead

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    weight, hidden, labels = _reference(B)

    linear = torch.nn.Linear(D, V, bias=False)  # the op takes fp32/bf16/fp16; the reference is fp64
    linear.weight.data.copy_(weight)
    head = FusedLMHead(linear, FusedCE(enable=True, backend="torch"))
    # torchtitan's plan for `output` with loss_parallel off (the fused runs turn it off).
    parallelize_module(head, mesh, ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()))
    assert head.weight.to_local().shape[0] == (6, 5)[rank]

    local = hidden[:, rank * S // 2 : (rank + 1) * S // 2].float().requires_grad_()
    if divisor is not None:  # as FusedCETrainer announces torchtitan's global token count
        head.expect_loss_divisor(torch.tensor(divisor))
    loss = head(local, labels=labels)
    (loss if divisor is None else loss / torch.tensor(divisor)).backward()
    assert head._loss_divisor is None  # used by this forward only
    out[rank] = (loss.detach().double(), local.grad.double(), head.weight.grad.full_tensor().double())
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("B, divisor", [(2, None), (1, None), (2, 7.0)])
def test_tp_head_matches_reference(B, divisor, tmp_path):
    weight, hidden, labels = _reference(B)
    weight.requires_grad_(), hidden.requires_grad_()
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), reduction="sum")
    (ref if divisor is None else ref / divisor).backward()

    out = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path / "init"), out, B, divisor), nprocs=2)
    for rank in (0, 1):
        loss, grad_hidden, grad_weight = out[rank]
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref.detach(), **close)
        torch.testing.assert_close(grad_hidden, hidden.grad[:, rank * S // 2 : (rank + 1) * S // 2], **close)
        torch.testing.assert_close(grad_weight, weight.grad, **close)
