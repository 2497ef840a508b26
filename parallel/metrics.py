"""Fused cross-entropy statistics for the trainer, and the metric tag names the repository shares.

The trainer (``parallel/train.py``, through ``FusedLMHead.stats``) uses this module. The API::

    from parallel.metrics import FusedCEStats

    stats = FusedCEStats()                       # one per trainer
    # every micro-batch, with FusedCEAux from fused_linear_cross_entropy(..., return_aux=True,
    # token_stats=True):
    stats.update(aux.lse.sum(), z_loss_sum, aux.valid_tokens,   # device tensors; no host sync
                 correct_sum=aux.correct.sum(), entropy_sum=aux.entropy.sum())
    # on log steps only (torchtitan: metrics_processor.should_log(step)):
    stats.flush(metrics_processor.logger, step)  # logs the fused_ce/* means, then resets

``FusedCEStats.update(lse_sum, z_loss_sum, valid_tokens, correct_sum=None, entropy_sum=None)``
    * ``lse_sum``: the sum of log-sum-exp over the valid (non-ignored) tokens of the
      micro-batch. ``FusedCEAux.lse`` is already 0 at ignored positions, so pass
      ``aux.lse.sum()``. A tensor with more than one element is summed on its device.
    * ``z_loss_sum``: the z-loss added to the loss, summed over the same tokens
      (coefficient included). With ``reduction="sum"`` this is ``aux.z_loss``. With
      ``reduction="mean"`` pass ``aux.z_loss * aux.valid_tokens``.
    * ``valid_tokens``: the number of non-ignored tokens (``aux.valid_tokens``).
    * ``correct_sum`` and ``entropy_sum`` (optional, both or neither): the number of valid
      tokens whose predicted token (argmax) is the label, ``aux.correct.sum()``, and the
      sum of the softmax entropy over the valid tokens, ``aux.entropy.sum()`` (0 at
      ignored positions already). Their ``valid_tokens`` are counted apart, so micro-batches
      without them do not dilute the means.
    Python numbers work too. The values are added in place into one float64 device
    buffer, on ``stats.device`` where set (the trainer sets its device), or else on
    the device of the first tensor passed. ``update`` never reads a value back to the host, so it
    adds no sync to the step.

``FusedCEStats.state_dict()`` / ``load_state_dict(sd)``
    The buffer under this process's rank, so that a checkpoint keeps each rank's window
    (``parallel/resume.py`` adds the stats to the trainer's checkpoint).

``FusedCEStats.flush(logger, step) -> dict``
    Reads the buffer to the host with one ``.tolist()``. Logs
    ``{"fused_ce/lse_mean": sum_lse / tokens, "fused_ce/z_loss": sum_z / tokens}``, plus
    ``"fused_ce/token_accuracy": correct / tokens`` and ``"fused_ce/entropy": sum_entropy /
    tokens`` when any update since the last flush passed them,
    through ``logger.log(dict, step)``, zeroes the buffer, and returns the dict.
    It logs nothing and returns ``{}`` if no tokens were counted since the last flush.
    Call it only on log steps, because it syncs.
    ``lse_mean`` is the mean log-sum-exp per valid token. It is the logit-drift signal
    that z-loss is meant to control. ``token_accuracy`` is the fraction of valid tokens
    whose argmax is the label; ``entropy`` the mean softmax entropy (nats) per valid token.
    ``FusedCEStats(reduce_group=g)`` sums the buffer over the process group ``g``
    before reading it, with one all-reduce. Use the data-parallel group, never the
    TP/vocab group, because TP ranks hold identical values. Every rank in ``g`` must
    then call ``flush`` at the same steps. Non-logging ranks pass torchtitan's no-op logger.

Tag names: the ``*_TAG`` constants below are the one list of the TensorBoard tags that the
repository writes or reads: the fused head's own, torchtitan 0.2.2's (``components/metrics.py``)
and the CPU memory tags (``CPU_MEMORY_RENAMES``: on a machine without an accelerator
``parallel/cpu_shims.py`` reports the process's resident set under torchtitan's memory tags
renamed, so that a CPU curve cannot be mistaken for GPU memory).
``benchmarks/compare_runs.py`` and ``benchmarks/e2e/soak.py`` read them from here.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = [
    "CPU_MEMORY_RENAMES",
    "CPU_RSS_CURRENT_TAG",
    "CPU_RSS_PEAK_TAG",
    "ENTROPY_TAG",
    "LOSS_TAG",
    "LSE_MEAN_TAG",
    "MAX_ACTIVE_TAG",
    "MAX_RESERVED_TAG",
    "MEMORY_PREFIX",
    "TOKEN_ACCURACY_TAG",
    "TPS_TAG",
    "SEED_TAG",
    "Z_LOSS_TAG",
    "FusedCEStats",
]

# The fused head's statistics (FusedCEStats.flush).
LSE_MEAN_TAG = "fused_ce/lse_mean"
Z_LOSS_TAG = "fused_ce/z_loss"
TOKEN_ACCURACY_TAG = "fused_ce/token_accuracy"
ENTROPY_TAG = "fused_ce/entropy"
# torchtitan's per-step tags.
LOSS_TAG = "loss_metrics/global_avg_loss"
TPS_TAG = "throughput(tps)"
MEMORY_PREFIX = "memory/"
MAX_RESERVED_TAG = MEMORY_PREFIX + "max_reserved(GiB)"
MAX_ACTIVE_TAG = MEMORY_PREFIX + "max_active(GiB)"
# On CPU: torchtitan's memory tag name -> what it holds there (the process's resident set size).
CPU_MEMORY_RENAMES = {"max_active": "cpu_rss_current", "max_reserved": "cpu_rss_peak"}
CPU_RSS_PEAK_TAG = MAX_RESERVED_TAG.replace("max_reserved", CPU_MEMORY_RENAMES["max_reserved"])
CPU_RSS_CURRENT_TAG = MAX_ACTIVE_TAG.replace("max_active", CPU_MEMORY_RENAMES["max_active"])
# A text tag, once per run: the job's debug.seed ("None" when unset), which a comparison of runs checks.
SEED_TAG = "job/seed"


class _Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...


class FusedCEStats:
    """Accumulates fused cross-entropy statistics on the device. See the module docstring."""

    # Buffer slots: the sums, then the token statistics' sums and their own token count.
    _LSE, _Z, _N, _CORRECT, _ENTROPY, _N_TOKEN_STATS = range(6)

    def __init__(self, reduce_group: Any = None) -> None:
        self.reduce_group = reduce_group
        self.device: torch.device | None = None  # the trainer sets it: where a resume loads the sums
        self._buf: torch.Tensor | None = None  # [6]: see the slots above

    def _buffer_for(self, *values: Any) -> torch.Tensor:
        if self._buf is None:
            device = self.device or next(
                (v.device for v in values if isinstance(v, torch.Tensor)),
                torch.device("cpu"),
            )
            self._buf = torch.zeros(6, dtype=torch.float64, device=device)
        return self._buf

    @staticmethod
    def _as_addend(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            v = v.detach()
            if v.numel() != 1:  # numel is metadata: no sync
                v = v.sum()
            return v.reshape(())
        return float(v)  # a Python number; nothing to sync

    def update(self, lse_sum: Any, z_loss_sum: Any, valid_tokens: Any, correct_sum: Any = None,
               entropy_sum: Any = None) -> None:
        """Add one micro-batch's sums to the device buffer. Does not sync."""
        if (correct_sum is None) != (entropy_sum is None):
            raise ValueError("correct_sum and entropy_sum go together (both or neither)")
        buf = self._buffer_for(lse_sum, z_loss_sum, valid_tokens)
        slots = [(self._LSE, lse_sum), (self._Z, z_loss_sum), (self._N, valid_tokens)]
        if correct_sum is not None:
            slots += [(self._CORRECT, correct_sum), (self._ENTROPY, entropy_sum),
                      (self._N_TOKEN_STATS, valid_tokens)]
        for slot, v in slots:
            v = self._as_addend(v)
            if isinstance(v, torch.Tensor) and v.device != buf.device and v.device.type != "cpu":
                v = v.to(buf.device, non_blocking=True)
            # A 0-dim CPU tensor is added to a device buffer as a scalar, which needs no sync.
            buf[slot].add_(v)

    def reset(self) -> None:
        if self._buf is not None:
            self._buf.zero_()

    def _checkpoint_key(self) -> str:
        import torch.distributed as dist

        # The sums differ across data-parallel ranks: each rank keeps its own (a 6-element
        # tensor under one shared key would be saved from one rank only).
        return f"rank_{dist.get_rank() if dist.is_initialized() else 0}"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sums since the last flush (torch.distributed.checkpoint's Stateful protocol)."""
        return {self._checkpoint_key(): self._buffer_for()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._buffer_for().copy_(state_dict[self._checkpoint_key()])

    def flush(self, logger: _Logger, step: int) -> dict[str, float]:
        """Sync once, log the per-token means, reset. Call only on log steps."""
        if self._buf is None:
            return {}
        buf = self._buf
        if self.reduce_group is not None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                buf = buf.clone()
                dist.all_reduce(buf, group=self.reduce_group)
        sum_lse, sum_z, n, correct, sum_entropy, n_token = buf.tolist()  # the one host transfer
        self.reset()
        if n <= 0:
            return {}
        metrics = {LSE_MEAN_TAG: sum_lse / n, Z_LOSS_TAG: sum_z / n}
        if n_token > 0:
            metrics[TOKEN_ACCURACY_TAG] = correct / n_token
            metrics[ENTROPY_TAG] = sum_entropy / n_token
        logger.log(metrics, step)
        return metrics
