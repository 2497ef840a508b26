"""The 4-GPU layouts (benchmarks/e2e/cases.py: fsdp2_tp2, fsdp2_cp2, tp2_cp2, hsdp),
fused head off and on, as a one-process dry run on torchtitan's fake backend (what
`COMM_MODE=fake_backend NGPU=4 ./run_train.sh` does): the debug model, the case's parallelism
flags, 1 step.

The fake backend builds the real device meshes and applies the real FSDP/TP/CP/HSDP plans, but
its collectives move no data, so it proves set-up, not numbers. All eight runs share ONE
subprocess (torchtitan is imported once; the fake process group is created once and each
Trainer builds its own meshes on it) to keep this file under a minute on 2 cores.

Trainer init must complete for all eight. The training step runs for fsdp2_tp2 and hsdp (off
and on); the CP layouts stop at a known CPU limit, and are skipped with that reason as long as
they fail exactly there (any other error fails the test): torchtitan's attention calls SDPA on
CP-sharded DTensors, and the CPU flash kernel has no DTensor sharding strategy
(NotImplementedError). CP needs the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
from benchmarks.e2e import cases

pytestmark = pytest.mark.slow  # a torchtitan job (in a subprocess); `pytest -m "not slow"` skips it

LAYOUTS = cases.MULTI4_CASES.split(",")
MODES = ("off", "on")
FAST = ("--training.seq_len", "128", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
        "--validation.no-enable")

class Limit(NamedTuple):
    """Where a run stops for a known reason that is not the fused head's: skipped (a limit of this
    machine or of torchtitan) or xfailed (a known bug), but only when it fails exactly there."""

    error: str  # substring of the error
    frame: str  # substring of one of its last frames
    reason: str
    known_bug: bool = False

    def matches(self, r: dict) -> bool:
        return self.error in r.get("error", "") and any(self.frame in f for f in r.get("where", []))

    def apply(self) -> None:
        (pytest.xfail if self.known_bug else pytest.skip)(self.reason)


SDPA_CP_LIMIT = Limit(
    "aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy",
    "torchtitan/models/attention.py",
    "context parallel on CPU: SDPA's CPU flash kernel has no DTensor sharding strategy "
    "(torchtitan/models/attention.py, ScaledDotProductAttentionWrapper.forward); CP runs on GPU only",
)
# (layout, mode) -> the limit its step stops at
CPU_LIMITS = {(lay, mode): SDPA_CP_LIMIT for lay in ("fsdp2_cp2", "tp2_cp2") for mode in MODES}


def dry_run_args(config: str, case_args, mode: str, dump: Path) -> list[str]:
    """The argv run_train.sh hands to `python -m parallel.train` with COMM_MODE=fake_backend:
    train_configs/<config>.toml with the layout's flags, fused head off or on, 1 step."""
    return [
        "--job.config_file", str(ROOT / "train_configs" / f"{config}.toml"),
        "--job.custom_config_module=parallel.config",
        "--job.dump_folder", str(dump), *FAST, *case_args,
        *(("--fused_ce.enable",) if mode == "on" else ()),
        "--comm.mode=fake_backend", "--training.steps=1",
    ]


def job_args(layout: str, mode: str, dump: Path) -> list[str]:
    ngpu, case_args, _ = cases.CASES[layout]
    assert ngpu == 4, layout
    return dry_run_args("debug_model", case_args, mode, dump / f"{layout}_{mode}")


def describe(trainer) -> dict:
    """What the parallelization did to the model and, with the fused head, to the head."""
    from torch.distributed.tensor import DTensor

    from parallel.fused_head import FusedCELoss, FusedLMHead

    model, dims = trainer.model_parts[0], trainer.parallel_dims
    w = model.output.weight
    out = {
        "dims": {k: getattr(dims, k) for k in ("dp_replicate", "dp_shard", "cp", "tp", "world_size")},
        "enabled": [k for k in ("dp_replicate", "dp_shard", "fsdp", "cp", "tp") if getattr(dims, f"{k}_enabled")],
        "head": type(model.output).__name__,
        "fused_head": isinstance(model.output, FusedLMHead),
        "weight_dtensor": isinstance(w, DTensor),
        "weight_mesh": list(w.device_mesh.mesh_dim_names or ()) if isinstance(w, DTensor) else [],
        "weight_placements": [str(p) for p in w.placements] if isinstance(w, DTensor) else [],
        "weight_local_shape": list(w.to_local().shape if isinstance(w, DTensor) else w.shape),
        "weight_shape": list(w.shape),
        "fsdp_wrapped_head_unit": type(model.norm).__name__.startswith("FSDP"),
        "tied": w is getattr(getattr(model, "tok_embeddings", None), "weight", None),
    }
    if isinstance(trainer.loss_fn, FusedCELoss):
        out["loss_bound_to_head"] = trainer.fused_head is model.output
        out["disable_loss_parallel"] = trainer.job_config.parallelism.disable_loss_parallel
        out["stats_reduce_group"] = model.output.stats.reduce_group is not None
    return out


def worker(dump: Path, combos: list[tuple[str, ...]], args_for) -> None:
    """Run in a subprocess: one Trainer per combo (`args_for(*combo, dump)` its argv) on one fake
    process group; prints one DRY_RUN_RESULT line per combo."""
    import traceback
    from unittest import mock

    from parallel.train import FusedCETrainer  # applies parallel.cpu_shims first
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger

    init_logger()
    for combo in combos:
        r: dict = {"combo": list(combo), "init": False, "step": False}
        trainer = None
        start = time.monotonic()
        try:
            trainer = FusedCETrainer(ConfigManager().parse_args(args_for(*combo, dump)))
            r["init"] = True
            r["model"] = describe(trainer)
            # torchtitan's train() ends by sleeping 2 s "for other ranks to complete": there are none here
            with mock.patch.object(time, "sleep"):
                trainer.train()
            r["step"] = trainer.step == 1
        except Exception as e:  # recorded; the test decides
            r["error"] = f"{type(e).__name__}: {e}"[:500]
            r["where"] = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)[-6:]]
            r["traceback"] = traceback.format_exc()[-4000:]
        finally:
            if trainer is not None:
                trainer.close()
        r["seconds"] = round(time.monotonic() - start, 1)
        print("DRY_RUN_RESULT " + json.dumps(r), flush=True)


def worker_main(args_for) -> None:
    """A dry-run test file's `__main__`: argv is the dump folder, then each combo as a/b/..."""
    worker(Path(sys.argv[1]), [tuple(c.split("/")) for c in sys.argv[2:]], args_for)


def run_dry_runs(script: str, dump: Path, combos: list[tuple[str, ...]], ngpu: int,
                 timeout: int = 600) -> dict[tuple[str, ...], dict]:
    """Run `script`'s worker_main over all `combos` in ONE subprocess on an `ngpu`-rank fake
    backend; {combo: result}. Every combo must report back."""
    env = {**os.environ, "NGPU": str(ngpu), "LOCAL_RANK": "0", "LOG_RANK": "0",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("HF_DATASETS_CACHE", str(ROOT / "outputs" / ".hf_datasets_cache"))
    proc = subprocess.run([sys.executable, script, str(dump), *("/".join(c) for c in combos)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("DRY_RUN_RESULT "):
            r = json.loads(line.split(" ", 1)[1])
            results[tuple(r["combo"])] = r
    assert proc.returncode == 0 and len(results) == len(combos), (
        f"worker rc={proc.returncode}, {len(results)}/{len(combos)} results\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return results


def check_step(r: dict, limit: Limit | None, init_limit: Limit | None = None) -> None:
    """The step ran, or the run stopped exactly at `limit` (or, with no Trainer, at `init_limit`):
    skipped or xfailed with its reason. Anything else fails."""
    label = "/".join(r["combo"])
    if r["step"]:
        return
    if not r["init"]:
        if init_limit and init_limit.matches(r):
            init_limit.apply()
        pytest.fail(f"{label}: no Trainer (see test_trainer_init)")
    if limit and limit.matches(r):
        limit.apply()
    pytest.fail(f"{label}: the step failed: {r.get('error')}\n{r.get('traceback')}")


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    combos = [(lay, mode) for lay in LAYOUTS for mode in MODES]
    return run_dry_runs(__file__, tmp_path_factory.mktemp("dry_run_layouts"), combos, ngpu=4)


# layout -> (mesh dims the head's weight lives on, enabled parallelisms)
EXPECTED = {
    "fsdp2_tp2": ({"fsdp", "tp"}, {"dp_shard", "fsdp", "tp"}),
    "fsdp2_cp2": ({"fsdp"}, {"dp_shard", "fsdp", "cp"}),
    "tp2_cp2": ({"fsdp", "tp"}, {"fsdp", "cp", "tp"}),
    "hsdp": ({"dp_replicate", "fsdp"}, {"dp_replicate", "dp_shard", "fsdp"}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_trainer_init(layout, mode, dry_runs):
    """Meshes built and the model parallelized: the head's weight is a DTensor on the layout's mesh."""
    r = dry_runs[layout, mode]
    assert r["init"], f"{layout}/{mode}: Trainer init failed: {r.get('error')}\n" + "\n".join(r.get("where", []))
    m = r["model"]
    mesh, enabled = EXPECTED[layout]
    assert m["dims"]["world_size"] == 4
    assert set(m["enabled"]) == enabled, m
    assert m["weight_dtensor"] and set(m["weight_mesh"]) == mesh, m
    assert m["weight_shape"] == [2048, 256]  # debugmodel: vocab 2048, dim 256
    assert m["weight_local_shape"][0] * m["weight_local_shape"][1] * 4 == 2048 * 256 * (
        2 if layout == "hsdp" else 1)  # sharded 4 ways (hsdp: 2 shards, replicated twice)
    if "tp" in enabled:  # vocab-sharded over TP: the weight is Shard(0) on the tp dim
        assert m["weight_placements"][m["weight_mesh"].index("tp")] in ("S(0)", "Shard(dim=0)"), m
    assert m["fsdp_wrapped_head_unit"], m  # every layout shards parameters: [norm, output] is one FSDP unit
    assert m["fused_head"] == (mode == "on") and m["head"].endswith("FusedLMHead" if mode == "on" else "Linear"), m
    if mode == "on":
        assert m["fused_head"] and m["loss_bound_to_head"] and m["disable_loss_parallel"] and m["stats_reduce_group"], m


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step(layout, mode, dry_runs):
    check_step(dry_runs[layout, mode], CPU_LIMITS.get((layout, mode)))


if __name__ == "__main__":
    worker_main(job_args)
