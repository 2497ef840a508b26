"""Every torchtitan 0.2.2 text decoder trains on the CPU with the fused head off (issue 14).

Stock torchtitan does not: the MoE families stop at `"histogram_cpu" not implemented for
'Long'` (deepseek_v3, llama4, qwen3 MoE: token counting), qwen3 MoE at a Triton kernel
("0 active drivers"), gpt_oss at `mat1 and mat2 must have the same dtype` (CPU autocast
refuses float32), then at FlexAttention's missing CPU backward, then at a NaN router bias.
`parallel/cpu_shims.py` carries one small shim per cause; this runs each family's debug
flavor for two steps through run_train.sh and checks the losses are finite.
"""

import math

import pytest

from conftest import losses, run_train

FAMILIES = [
    ("llama3", "debugmodel"),
    ("qwen3", "debugmodel"),
    ("qwen3", "debugmodel_moe"),
    ("llama4", "debugmodel"),
    ("deepseek_v3", "debugmodel"),
    ("gpt_oss", "debugmodel"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,flavor", FAMILIES, ids=[f"{n}-{f}" for n, f in FAMILIES])
def test_family_debug_flavor_trains_on_cpu_baseline(tmp_path, name, flavor):
    proc, _ = run_train(
        tmp_path, "--model.name", name, "--model.flavor", flavor, "--fused_ce.no-enable",
        "--training.steps", "2", "--training.seq_len", "64", "--training.local_batch_size", "2",
        "--metrics.log_freq", "1", "--validation.no-enable", "--checkpoint.no-enable",
        timeout=600,
    )
    per_step = losses(tmp_path)
    assert sorted(per_step) == [1, 2], proc.stdout[-3000:]
    assert all(math.isfinite(v) for v in per_step.values()), per_step
