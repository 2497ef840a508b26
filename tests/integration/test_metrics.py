"""Tests for parallel.metrics: FusedCEStats and the shared tag names (CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

from parallel import metrics
from parallel.metrics import FusedCEStats


class RecordingLogger:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def log(self, metrics, step):
        self.calls.append((dict(metrics), step))


def micro_batches(seed=0):
    """Per-token lse (0 where ignored) with labels, as FusedCEAux would give."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        lse = 9.0 + torch.rand(4, 16, generator=g) * 3
        valid = torch.rand(4, 16, generator=g) > 0.25
        lse = torch.where(valid, lse, torch.zeros_like(lse))
        out.append((lse, valid))
    return out


def test_hand_computation():
    coef = 1e-4
    stats = FusedCEStats()
    logger = RecordingLogger()
    batches = micro_batches()
    tot_lse = tot_z = tot_n = 0.0
    for lse, valid in batches:
        z_sum = coef * (lse.double() ** 2).sum()
        stats.update(lse.sum(), z_sum, valid.sum())
        tot_lse += sum(float(x) for x in lse[valid].tolist())
        tot_z += sum(coef * float(x) ** 2 for x in lse[valid].tolist())
        tot_n += int(valid.sum())
    out = stats.flush(logger, step=10)
    assert logger.calls == [(out, 10)]
    assert set(out) == {"fused_ce/lse_mean", "fused_ce/z_loss"}
    assert out["fused_ce/lse_mean"] == pytest.approx(tot_lse / tot_n, rel=1e-6)
    assert out["fused_ce/z_loss"] == pytest.approx(tot_z / tot_n, rel=1e-6)
    assert 9.0 < out["fused_ce/lse_mean"] < 12.0


def test_flush_resets_and_empty_flush_logs_nothing():
    stats = FusedCEStats()
    logger = RecordingLogger()
    assert stats.flush(logger, 1) == {}  # never updated
    stats.update(torch.tensor(20.0), torch.tensor(0.4), torch.tensor(4))
    assert stats.flush(logger, 1) == {"fused_ce/lse_mean": 5.0, "fused_ce/z_loss": pytest.approx(0.1)}
    assert stats.flush(logger, 2) == {}  # reset after flush: nothing since
    stats.update(torch.tensor(3.0), torch.tensor(0.0), torch.tensor(1))
    assert stats.flush(logger, 3)["fused_ce/lse_mean"] == 3.0
    assert [s for _, s in logger.calls] == [1, 3]


def test_non_scalar_and_python_number_inputs():
    stats = FusedCEStats()
    stats.update(torch.tensor([1.0, 2.0, 0.0]), 0.3, 2)  # per-token lse is summed on the device
    stats.update(torch.tensor(3.0, dtype=torch.bfloat16), torch.tensor(0.3), torch.tensor(1, dtype=torch.int64))
    out = stats.flush(RecordingLogger(), 1)
    assert out["fused_ce/lse_mean"] == pytest.approx(2.0)
    assert out["fused_ce/z_loss"] == pytest.approx(0.2)


def test_update_does_not_sync(monkeypatch):
    """update() must never read a value back to the host. Only flush may do that, once."""
    stats = FusedCEStats()
    host_reads = []

    def forbid(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            host_reads.append(name)
            return orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        forbid(name)

    for lse, valid in micro_batches():
        stats.update(lse.sum(), (1e-4 * lse**2).sum(), valid.sum(), correct_sum=valid[0].sum(),
                     entropy_sum=lse / 3)
    assert host_reads == [], f"update() read values to the host: {host_reads}"

    stats.flush(RecordingLogger(), 5)
    assert host_reads == ["tolist"]  # one host transfer per flush


def test_token_accuracy_and_entropy_from_the_ops_aux():
    """fused_ce/token_accuracy and fused_ce/entropy: per valid token over the micro-batches
    since the last flush, from FusedCEAux's correct and entropy, summed on the device."""
    from fused_loss import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    stats, logger = FusedCEStats(), RecordingLogger()
    correct = entropy = tokens = 0.0
    for n in (7, 1, 12):
        hidden, weight = torch.randn(n, 5, generator=g) * 3, torch.randn(41, 5, generator=g)
        logits = (hidden.double() @ weight.double().t())
        labels = torch.randint(0, 41, (n,), generator=g)
        labels[: n // 2] = logits[: n // 2].argmax(1)  # some right
        labels[torch.rand(n, generator=g) < 0.3] = -100
        _, aux = fused_linear_cross_entropy(hidden, weight, labels, return_aux=True,
                                            token_stats=True)
        stats.update(aux.lse.sum(), aux.z_loss, aux.valid_tokens,
                     correct_sum=aux.correct.sum(), entropy_sum=aux.entropy.sum())
        valid = labels != -100
        correct += float(((logits.argmax(1) == labels) & valid).sum())
        p = torch.softmax(logits, 1)
        entropy += float((-(p * torch.log_softmax(logits, 1)).sum(1) * valid).sum())
        tokens += float(valid.sum())
    out = stats.flush(logger, 4)
    assert logger.calls == [(out, 4)]
    assert out["fused_ce/token_accuracy"] == pytest.approx(correct / tokens, rel=1e-9)
    assert out["fused_ce/entropy"] == pytest.approx(entropy / tokens, rel=1e-5)
    assert (metrics.TOKEN_ACCURACY_TAG, metrics.ENTROPY_TAG) == (
        "fused_ce/token_accuracy", "fused_ce/entropy")


def test_token_statistics_only_where_given():
    """Updates without correct/entropy neither log those tags nor dilute their means."""
    stats, logger = FusedCEStats(), RecordingLogger()
    stats.update(torch.tensor(20.0), torch.tensor(0.4), torch.tensor(4))
    assert set(stats.flush(logger, 1)) == {"fused_ce/lse_mean", "fused_ce/z_loss"}
    stats.update(torch.tensor(20.0), torch.tensor(0.4), torch.tensor(4))
    stats.update(torch.tensor(5.0), 0.0, torch.tensor(2), correct_sum=torch.tensor(1),
                 entropy_sum=torch.tensor(3.0, dtype=torch.float32))
    out = stats.flush(logger, 2)
    assert out["fused_ce/lse_mean"] == pytest.approx(25.0 / 6)
    assert out["fused_ce/token_accuracy"] == 0.5 and out["fused_ce/entropy"] == 1.5
    with pytest.raises(ValueError, match="correct_sum and entropy_sum go together"):
        stats.update(1.0, 0.0, 1, correct_sum=1)


def test_update_on_meta_tensors():
    """Meta tensors have no data, so any host sync in update() would raise."""
    stats = FusedCEStats()
    for _ in range(2):
        stats.update(
            torch.empty(4, 8, device="meta"),
            torch.empty((), device="meta"),
            torch.empty((), dtype=torch.int64, device="meta"),
            correct_sum=torch.empty((), dtype=torch.int64, device="meta"),
            entropy_sum=torch.empty(4, 8, device="meta"),
        )
    assert stats._buf is not None and stats._buf.device.type == "meta"


def test_buffer_is_in_place():
    stats = FusedCEStats()
    stats.update(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1))
    buf = stats._buf
    ptr = buf.data_ptr()
    stats.update(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1))
    stats.flush(RecordingLogger(), 1)
    assert stats._buf is buf and buf.data_ptr() == ptr and buf.tolist() == [0.0] * 6


def test_cpu_memory_tags_are_what_the_cpu_shims_log():
    """The CPU shims rename torchtitan's memory tags to exactly the names the report reads."""
    from parallel.cpu_shims import _RenameMemoryTags

    inner = RecordingLogger()
    _RenameMemoryTags(inner).log({metrics.MAX_RESERVED_TAG: 2.0, metrics.MAX_ACTIVE_TAG: 1.0,
                                  metrics.LOSS_TAG: 3.0, "memory/num_ooms": 0}, 7)
    assert inner.calls == [({metrics.CPU_RSS_PEAK_TAG: 2.0, metrics.CPU_RSS_CURRENT_TAG: 1.0,
                             "loss_metrics/global_avg_loss": 3.0}, 7)]
    assert (metrics.CPU_RSS_PEAK_TAG, metrics.CPU_RSS_CURRENT_TAG) == (
        "memory/cpu_rss_peak(GiB)", "memory/cpu_rss_current(GiB)")
    assert set(metrics.__all__) <= set(dir(metrics))


def test_reduce_group_single_process(tmp_path):
    """With reduce_group, flush all-reduces the sums first (here a 1-rank gloo group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        stats = FusedCEStats(reduce_group=dist.group.WORLD)
        stats.update(torch.tensor(22.0), torch.tensor(0.2), torch.tensor(2),
                     correct_sum=torch.tensor(1), entropy_sum=torch.tensor(3.0))
        out = stats.flush(RecordingLogger(), 1)
        assert out == {"fused_ce/lse_mean": 11.0, "fused_ce/z_loss": pytest.approx(0.1),
                       "fused_ce/token_accuracy": 0.5, "fused_ce/entropy": 1.5}
        assert stats._buf.tolist() == [0.0] * 6
    finally:
        dist.destroy_process_group()


def test_fused_head_logs_token_accuracy_and_entropy_in_training_only():
    """FusedLMHead asks the op for the token statistics while training and sums them into
    its FusedCEStats; in eval mode (validation) it asks for none and adds nothing."""
    from parallel.config import FusedCE
    from parallel.fused_head import FusedLMHead

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    linear = torch.nn.Linear(6, 37, bias=False)
    head = FusedLMHead(linear, FusedCE(enable=True, backend="torch"))
    hidden = torch.randn(2, 5, 6, generator=g) * 3
    logits = hidden.double() @ linear.weight.detach().double().t()
    labels = torch.randint(0, 37, (2, 5), generator=g)
    labels[0, :3] = logits[0, :3].argmax(-1)
    labels[1, 0] = -100
    head.train()
    head(hidden, labels=labels).backward()
    head.eval()
    with torch.no_grad():
        head(hidden * 0.5, labels=torch.zeros_like(labels))  # validation: not in the stats
    out = head.stats.flush(RecordingLogger(), 1)
    valid = labels != -100
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    assert out[metrics.TOKEN_ACCURACY_TAG] == pytest.approx(
        float(((logits.argmax(-1) == labels) & valid).sum()) / float(valid.sum()), rel=1e-9)
    assert out[metrics.ENTROPY_TAG] == pytest.approx(float(entropy[valid].mean()), rel=1e-5)
    assert out[metrics.LSE_MEAN_TAG] == pytest.approx(
        float(torch.logsumexp(logits, -1)[valid].mean()), rel=1e-6)


def test_stats_buffer_is_float64_on_the_first_values_device_or_the_one_set():
    """The buffer's device is the trainer's (stats.device) or the first tensor's; always float64.
    There is no device= argument: the trainer sets the attribute once the device is known."""
    import inspect

    assert list(inspect.signature(FusedCEStats).parameters) == ["reduce_group"]
    stats = FusedCEStats()
    stats.update(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(4))
    assert stats._buf.dtype == torch.float64 and stats._buf.device.type == "cpu"
    stats = FusedCEStats()
    stats.device = torch.device("cpu")
    stats.update(1.0, 0.0, 2)
    assert stats._buf.dtype == torch.float64 and stats._buf.device == torch.device("cpu")
