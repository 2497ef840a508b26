"""A tied LM head (qwen3's small flavors: output.weight IS tok_embeddings.weight) under TP=2
and FSDP2 on 2 gloo ranks: the gradient of the one shared parameter - from the embedding and
from the fused head - must equal a single-process fp64 reference.

TP as the families' plans shard it (embedding RowwiseParallel, head ColwiseParallel with
loss_parallel off; both vocab-sharded Shard(0), re-tied after sharding as qwen3's init_weights
does), with an uneven vocabulary (11 rows: 6 + 5). FSDP2 with the tied pair in one FSDP group
(torch >= 2.13 refuses it in two), each rank with its own batch, gradients averaged.
"""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

V, D, B, S = 11, 8, 2, 4


def _reference():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (2, B, S), generator=g)  # one batch per rank (FSDP); TP uses [0]
    labels = torch.randint(0, V, (2, B, S), generator=g)
    labels[0, 0, 1] = labels[1, 1, 2] = -100
    return weight, tokens, labels


def _expected(batches):
    """Sum loss of `batches` and the shared weight's gradient (embedding + head), in fp64."""
    weight, tokens, labels = _reference()
    weight.requires_grad_()
    loss = sum(F.cross_entropy(((2 * weight[tokens[b]]) @ weight.T).flatten(0, 1), labels[b].flatten(),
                               reduction="sum") for b in batches)
    loss.backward()
    return loss.detach(), weight.grad


class TiedModel(torch.nn.Module):
    """The ending every torchtitan decoder shares: embedding, blocks (here h * 2), head."""

    def __init__(self):
        from parallel.config import FusedCE
        from parallel.fused_head import FusedLMHead

        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(V, D)
        self.output = FusedLMHead(torch.nn.Linear(D, V, bias=False), FusedCE(enable=True, backend="torch"))
        self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens):
        return self.output(2 * self.tok_embeddings(tokens))


def _rank(rank: int, layout: str, init_file: str, out: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module, RowwiseParallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    weight, tokens, labels = _reference()
    model = TiedModel()
    model.tok_embeddings.weight.data.copy_(weight)
    if layout == "tp2":
        parallelize_module(model, mesh, {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        })
        model.output.weight = model.tok_embeddings.weight  # re-tied, as qwen3's init_weights does
        assert model.output.vocab_slice() == ((0, 6, 11), (6, 5, 11))[rank]
        batch = 0  # the same batch on both ranks
    else:
        fully_shard([model.tok_embeddings, model.output], mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root, as torchtitan's apply_fsdp ends
        batch = rank  # data parallel: each rank its own batch
    model.output.expect_labels(labels[batch])
    loss = model(tokens[batch])
    loss.backward()
    grad = model.tok_embeddings.weight.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    assert model.output.weight is model.tok_embeddings.weight
    out[rank] = (loss.detach().double(), grad.double())
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("layout", ["tp2", "fsdp2"])
def test_tied_weight_gradient_matches_reference(layout, tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(layout, str(tmp_path / "init"), out), nprocs=2)
    close = dict(rtol=1e-5, atol=1e-6)
    if layout == "tp2":
        ref_loss, ref_grad = _expected([0])
        for rank in (0, 1):
            torch.testing.assert_close(out[rank][0], ref_loss, **close)
            torch.testing.assert_close(out[rank][1], ref_grad, **close)
    else:  # FSDP2 averages the two ranks' gradients (its default divide factor)
        ref_loss, ref_grad = _expected([0, 1])
        torch.testing.assert_close(out[0][0] + out[1][0], ref_loss, **close)
        for rank in (0, 1):
            torch.testing.assert_close(out[rank][1], ref_grad / 2, **close)
