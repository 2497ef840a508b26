"""The fused LM head: `model.output` computes the loss from hidden states.

Every torchtitan decoder ends its forward with `self.output(self.norm(h))`.
With `[fused_ce] enable` that call is the fused loss: the trainer hands the
batch's labels to the head (`expect_labels`) right before the forward, and the
model returns the sum loss instead of logits. The head is called as the module
it is, inside the model's forward, so its FSDP2 hooks (all-gather of the
weight before, reshard after) and its TP hooks run exactly once, as they do
for the baseline's `nn.Linear`: the fused op sees the unsharded weight, never
the sharded DTensor parameter.

The head is an `nn.Linear` holding the same `weight` Parameter (`output.weight`,
[V, D]; qwen3's tied flavors share it with `tok_embeddings.weight`), so
checkpoints move between fused and baseline runs, and each family's TP plan for
`output` applies unchanged: with loss_parallel off that is
`ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())`, which
shards the weight Shard(0) over the vocabulary and all-gathers the
sequence-parallel hidden states before `forward`.
"""

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torchtitan.components.loss import IGNORE_INDEX

from fused_loss import fused_linear_cross_entropy

from parallel.config import FusedCE, kernel_options
from parallel.metrics import FusedCEStats


class FusedLMHead(nn.Linear):
    """`nn.Linear(dim, vocab, bias=False)` whose forward is the fused linear + cross-entropy.

    `forward(hidden)` scores the labels given to `expect_labels` (once: a forward
    without fresh labels is an error, never a silent reuse of stale ones).
    `stats` sums the op's side outputs (logsumexp, z-loss, valid tokens, correct
    predictions, entropy) of the training micro-batches on the device, with no
    host sync; the trainer flushes them to the metric logger on log steps.
    """

    def __init__(self, linear: nn.Linear, cfg: FusedCE):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight  # the same Parameter: same name, shape, init and checkpoint key
        self.options = dict(
            ignore_index=IGNORE_INDEX,
            reduction="sum",  # torchtitan divides by the global valid-token count
            check_labels=False,  # the trainer checks the CPU labels instead (a device check syncs)
            **kernel_options(cfg),
        )
        self.stats = FusedCEStats()
        self._labels: torch.Tensor | None = None
        self._loss_divisor: torch.Tensor | None = None

    def vocab_slice(self) -> tuple[int, int, int]:
        """(vocab_start, rows, vocab_size): the vocabulary rows this rank holds (all of them
        without TP; a Shard(0) slice under TP, uneven where the vocabulary does not divide)."""
        if not isinstance(self.weight, DTensor):
            return 0, self.weight.shape[0], self.weight.shape[0]
        w = self.weight
        local, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        return offset[0], local[0], w.shape[0]

    def expect_labels(self, labels: torch.Tensor) -> None:
        """The labels the next forward scores (the trainer calls this before each model forward)."""
        self._labels = labels

    def expect_loss_divisor(self, divisor: torch.Tensor) -> None:
        """What the trainer divides the next forward's loss by before its backward (torchtitan:
        the global valid-token count): the op then knows the gradient its loss will get."""
        self._loss_divisor = divisor

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        divisor, self._loss_divisor = self._loss_divisor, None
        if labels is None:
            labels, self._labels = self._labels, None
        if labels is None:
            raise RuntimeError(
                "[fused_ce] the fused head was called without labels: with [fused_ce] enable the "
                "model's forward is the loss. Launch with `python -m parallel.train` "
                "(run_train.sh does), which hands each batch's labels to model.output first"
            )
        weight, mesh, parallel = self.weight, None, {}
        if isinstance(weight, DTensor):
            # Tensor parallel: this rank holds vocab rows [vocab_start, vocab_start + V_local)
            # (uneven shards allowed). The input gradient of the op is a partial sum over
            # the TP ranks; marking it Partial lets DTensor reduce-scatter it back to Shard(1).
            mesh = weight.device_mesh
            vocab_start, _, vocab_size = self.vocab_slice()
            parallel = dict(vocab_start=vocab_start, vocab_size=vocab_size, process_group=mesh.get_group())
            hidden = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            if isinstance(hidden, AsyncCollectiveTensor):
                # One sequence per rank: the all-gather's result comes back as is, not waited on.
                # A copy (not a view, which would stay un-waited) waits and keeps autograd's path.
                hidden = hidden.clone()
            weight = weight.to_local()

        # Under autocast the op computes in autocast's dtype, as the baseline's F.linear would.
        # token_stats: entropy and predicted token from the same pass (training stats only)
        # d(loss / divisor)/d(loss) = 1 / divisor, computed as autograd's division computes it
        grad_scale = None
        if divisor is not None and torch.is_grad_enabled():
            grad_scale = torch.ones((), dtype=torch.float32, device=hidden.device) / divisor
        loss, aux = fused_linear_cross_entropy(
            hidden, weight, labels, **self.options, **parallel, return_aux=True,
            token_stats=self.training, grad_scale=grad_scale,
        )
        if self.training:  # validation runs in eval mode and stays out of the training stats
            self.stats.update(aux.lse.sum(), aux.z_loss, aux.valid_tokens,
                              correct_sum=aux.correct.sum(), entropy_sum=aux.entropy.sum())

        if mesh is not None:
            # Every TP rank computed the same full loss. torchtitan's ColwiseParallel output
            # hook expects a DTensor and hands back its local value.
            loss = DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
        return loss


class FusedCELoss:
    """What `build_loss_fn` returns with `[fused_ce] enable`: the model's forward ended
    in the fused head, so `pred` already is the sum loss over this rank's tokens."""

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if pred.dim() != 0:
            raise RuntimeError(
                f"[fused_ce] the model returned a tensor of shape {tuple(pred.shape)}, not the "
                "fused head's loss: its forward must end with `self.output(h)`"
            )
        return pred
