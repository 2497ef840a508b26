"""End to end on CPU (gloo, fp32): every torchtitan decoder family's debug config, as torchtitan
names it, trains with `--fused_ce.enable` added and nothing else, and gives the baseline's
per-step losses; MoE (deepseek_v3) under TP=2 and FSDP=2; checkpoints of the tied qwen3 cross
between the two modes. (llama3, the default config, is covered by test_job.py; qwen3's MoE
flavor, in one process, by test_specs.py.)

Stock torchtitan 0.2.2 trains none of the MoE families, nor gpt_oss, on CPU even with the
fused head off; `parallel/cpu_shims.py` carries one small shim per cause (integer histogram,
qwen3-MoE experts as a loop, CPU autocast to float32, eager FlexAttention, gpt_oss's router
bias): every baseline run here depends on them.
"""

import shutil

import pytest
from conftest import assert_close, FAST, losses, ROOT, run_train

pytestmark = pytest.mark.slow  # torchrun jobs; `pytest -m "not slow"` skips them

REL = 1e-4
STEPS = 10
NO_VALIDATION = ("--validation.no-enable",)
FUSED = ("--fused_ce.enable",)
LAYOUTS = {
    "one": ("1", ()),
    "tp2": ("2", ("--parallelism.tensor_parallel_degree", "2")),
    "fsdp2": ("2", ("--parallelism.data_parallel_shard_degree", "2")),
}
# qwen3's tied flavors cannot run TP=2 or FSDP=2 on CPU even with the fused head off (TP: its
# attention gets DTensors, and SDPA's CPU kernel has no sharding rule; FSDP2 in torch >= 2.13
# refuses the tied weight in two FSDP groups, as torchtitan 0.2.2 groups it): the tied head under
# TP and FSDP2 is proved by test_tied_head.py instead.
CASES = [(c, "one") for c in ("qwen3_debug", "llama4_debug", "deepseek_v3_debug", "gpt_oss_debug")] + [
    ("deepseek_v3_debug", layout) for layout in ("tp2", "fsdp2")
]


def train(dump, config: str, layout: str, *args: str, steps: int = STEPS):
    ngpu, layout_args = LAYOUTS[layout]
    run_train(dump, *FAST, *NO_VALIDATION, "--training.steps", str(steps), *layout_args, *args,
              env={"CONFIG_FILE": str(ROOT / "train_configs" / f"{config}.toml"), "NGPU": ngpu},
              timeout=900)
    return dump


@pytest.mark.parametrize("config, layout", CASES)
def test_family_fused_matches_baseline(config, layout, tmp_path):
    base = train(tmp_path / "base", config, layout)
    fused = train(tmp_path / "fused", config, layout, *FUSED)
    assert_close(losses(fused), losses(base), REL, range(1, STEPS + 1))


@pytest.mark.parametrize("first, then", [((), FUSED), (FUSED, ())], ids=["off-then-on", "on-then-off"])
def test_checkpoint_crosses_modes(first, then, tmp_path):
    """Tied qwen3: 10 steps in one mode == 5 steps, checkpoint, 5 more in the other mode."""
    ckpt = ("--checkpoint.enable", "--checkpoint.interval", "5")
    full = train(tmp_path / "full", "qwen3_debug", "one", *ckpt, *first)
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint" / "step-5", resumed / "checkpoint" / "step-5")
    train(resumed, "qwen3_debug", "one", *ckpt, *then)
    assert sorted(losses(resumed)) == list(range(6, STEPS + 1))
    assert_close(losses(resumed), losses(full), REL, range(6, STEPS + 1))
