"""The torchtitan 0.2.2 fixes this project applies on every device, accelerator or not."""

import subprocess
import sys

from conftest import ROOT

# A process that sees an accelerator (faked: torch is asked before the project patches anything),
# applies the project's patches as the trainer does, then initializes a gpt_oss-style router.
_ROUTER_ON_AN_ACCELERATOR = """
import logging, torch
torch._utils._get_available_device_type = lambda: "cuda"
from parallel import patches
patches.apply()
logging.basicConfig(level=logging.INFO, format="%(message)s")
from torchtitan.models.moe.moe import TokenChoiceTopKRouter
for _ in range(2):
    router = TokenChoiceTopKRouter(dim=8, num_experts=4, num_expert_groups=None, num_limited_groups=None,
                                   top_k=2, score_func="softmax", route_norm=False, route_scale=1.0, gate_bias=True)
    with torch.no_grad():  # as torchtitan initializes its models
        router.gate.bias.fill_(float("nan"))  # what torch.empty may hold
        router.init_weights(0.02)
    print("bias", router.gate.bias.tolist())
"""


def test_router_gate_bias_is_zeroed_where_an_accelerator_exists():
    proc = subprocess.run([sys.executable, "-c", _ROUTER_ON_AN_ACCELERATOR], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bias [0.0, 0.0, 0.0, 0.0]") == 2, proc.stdout + proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "pytorch/torchtitan#2450" in line]
    assert len(said) == 1, proc.stdout + proc.stderr[-3000:]  # one start-up line, not one per router
    assert "gate bias" in said[0]
