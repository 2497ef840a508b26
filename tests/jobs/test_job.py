"""End to end: the debug job through run_train.sh on CPU (gloo), fused head on vs off.

fp32, fixed seed, deterministic algorithms: the fused loss must reproduce the
baseline's per-step loss and grad norm, in one process, with TP=2, with DDP=2,
across a simulated 2-node launch, and across checkpoints saved in either mode.
"""

import os
import shutil
import socket
import subprocess

import pytest
from conftest import assert_close, FAST, losses, ROOT, run_train, scalars

pytestmark = pytest.mark.slow  # torchrun jobs; `pytest -m "not slow"` skips them

REL = 1e-4
CKPT = ("--checkpoint.enable", "--checkpoint.interval", "10")
VALIDATE = ("--validation.enable", "--validation.freq", "10", "--validation.steps", "1")
FUSED = ("--fused_ce.enable",)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    dump = tmp_path_factory.mktemp("baseline")
    run_train(dump, *FAST, "--training.steps", "20", *CKPT, *VALIDATE)
    return dump


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    dump = tmp_path_factory.mktemp("fused")
    run_train(dump, *FAST, "--training.steps", "20", *CKPT, *VALIDATE, *FUSED)
    return dump


def test_fused_matches_baseline(baseline, fused):
    steps = range(1, 21)
    assert_close(losses(fused), losses(baseline), REL, steps)
    assert_close(scalars(fused, "grad_norm"), scalars(baseline, "grad_norm"), REL, steps)
    # Validation (no gradients) also runs through the fused head.
    val = "validation_metrics/loss"
    assert_close(scalars(fused, val), scalars(baseline, val), REL, (10, 20))


def test_fused_stats_are_logged(fused):
    lse, z = scalars(fused, "fused_ce/lse_mean"), scalars(fused, "fused_ce/z_loss")
    assert sorted(lse) == list(range(1, 21)) and all(v > 0 for v in lse.values())
    assert all(v == 0 for v in z.values())  # z_loss is off


def test_resume_is_bit_identical(fused, tmp_path):
    """20 fused steps == 10 steps, checkpoint, resume for 10 more."""
    shutil.copytree(fused / "checkpoint" / "step-10", tmp_path / "checkpoint" / "step-10")
    run_train(tmp_path, *FAST, "--training.steps", "20", *CKPT, *FUSED)
    resumed, full = losses(tmp_path), losses(fused)
    assert sorted(resumed) == list(range(11, 21))
    assert [resumed[s] for s in range(11, 21)] == [full[s] for s in range(11, 21)]


def _model_keys(checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    from parallel.resume import STATS_KEY

    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {k for k in keys
            if not k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state", STATS_KEY))}


@pytest.mark.parametrize("save, resume", [("baseline", "fused"), ("fused", "baseline")])
def test_checkpoint_moves_between_modes(save, resume, baseline, fused, tmp_path):
    saved = {"baseline": baseline, "fused": fused}[save]
    assert _model_keys(baseline / "checkpoint" / "step-10") == _model_keys(fused / "checkpoint" / "step-10")
    assert "output.weight" in _model_keys(saved / "checkpoint" / "step-10")

    shutil.copytree(saved / "checkpoint" / "step-10", tmp_path / "checkpoint" / "step-10")
    run_train(tmp_path, *FAST, "--training.steps", "12", *CKPT, *(FUSED if resume == "fused" else ()))
    assert_close(losses(tmp_path), losses(saved), REL, (11, 12))


PARALLEL = {
    "tp2": ("--parallelism.tensor_parallel_degree", "2"),
    "ddp2": ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"),
}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    runs = {}
    for name, args in PARALLEL.items():
        for mode, extra in (("baseline", ()), ("fused", FUSED)):
            dump = tmp_path_factory.mktemp(f"{name}_{mode}")
            run_train(dump, *FAST, "--training.steps", "10", *args, *extra, env={"NGPU": "2"})
            runs[name, mode] = dump
    return runs


@pytest.mark.parametrize("name", list(PARALLEL))
def test_two_processes_fused_matches_baseline(name, two_process_runs):
    base, fused_run = two_process_runs[name, "baseline"], two_process_runs[name, "fused"]
    steps = range(1, 11)
    assert_close(losses(fused_run), losses(base), REL, steps)
    assert_close(scalars(fused_run, "grad_norm"), scalars(base, "grad_norm"), REL, steps)


def test_two_nodes_on_localhost(tmp_path, two_process_runs):
    """NNODES=2 over c10d rendezvous, one process per 'node': the same job as DDP=2 on one node."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ["--job.dump_folder", str(tmp_path), *FAST, "--training.steps", "3", *PARALLEL["ddp2"], *FUSED]
    nodes = [
        subprocess.Popen(
            ["./run_train.sh", *args],
            cwd=ROOT,
            env={**os.environ, "NGPU": "1", "NNODES": "2", "NODE_RANK": str(rank),
                 "RDZV_ENDPOINT": f"localhost:{port}", "RDZV_ID": f"test{port}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out[-6000:]
    assert_close(losses(tmp_path), losses(two_process_runs["ddp2", "fused"]), REL, (1, 2, 3))


def _weights(dump, step):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(dump / "checkpoint" / f"step-{step}", dump / "weights.pt")
    state = torch.load(dump / "weights.pt", weights_only=False)
    return {k: v for k, v in state.items() if k in _model_keys(dump / "checkpoint" / f"step-{step}")}


@pytest.fixture(scope="module")
def fsdp_baseline(tmp_path_factory):
    dump = tmp_path_factory.mktemp("fsdp_baseline")
    run_train(dump, *FAST, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "3", env={"NGPU": "2"})
    return dump


@pytest.mark.parametrize("reshard", ["default", "always", "never"])
def test_fsdp_fused_matches_baseline(reshard, fsdp_baseline, tmp_path):
    """FSDP2 over 2 ranks groups [norm, output] in one unit; the fused head must see the
    all-gathered weight and hand back the same gradients under every reshard policy."""
    run_train(
        tmp_path, *FAST, "--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "3",
        "--parallelism.fsdp_reshard_after_forward", reshard, *FUSED, env={"NGPU": "2"},
    )
    steps = (1, 2, 3)
    assert_close(losses(tmp_path), losses(fsdp_baseline), REL, steps)
    assert_close(scalars(tmp_path, "grad_norm"), scalars(fsdp_baseline, "grad_norm"), REL, steps)
    fused_w, base_w = _weights(tmp_path, 3), _weights(fsdp_baseline, 3)
    assert fused_w.keys() == base_w.keys() and "norm.weight" in fused_w
    for key in base_w:
        assert (fused_w[key] - base_w[key]).abs().max() < 1e-5, key


def test_bf16_autocast_fused_close_to_baseline(tmp_path):
    """One process with bf16 autocast: the head casts hidden and weight to bf16 for the op."""
    bf16 = ("--training.mixed_precision_param", "bfloat16", "--training.steps", "3", "--validation.no-enable")
    run_train(tmp_path / "base", *FAST, *bf16)
    run_train(tmp_path / "fused", *FAST, *bf16, *FUSED)
    assert_close(losses(tmp_path / "fused"), losses(tmp_path / "base"), 1e-3, (1, 2, 3))


def test_comm_mode_fake_backend_dry_run(tmp_path):
    """COMM_MODE=fake_backend: one process stands in for 4 FSDP ranks, 1 step."""
    proc, _ = run_train(tmp_path, *FAST, "--validation.no-enable", *FUSED, env={"COMM_MODE": "fake_backend", "NGPU": "4"})
    assert "step:  1" in proc.stdout + proc.stderr
