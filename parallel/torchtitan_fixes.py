"""Fixes of torchtitan 0.2.2 this project applies on every device, accelerator or not;
installed by parallel.patches."""

import logging

import torch


ROUTER_BIAS_NOTE = ("router gate bias zeroed at init: torchtitan 0.2.2 leaves it uninitialized (torch.empty), "
                    "as later torchtitan no longer does (pytorch/torchtitan#2450)")


def _router_bias_initialized(init_weights):
    said = []

    def wrapped(self, init_std):
        init_weights(self, init_std)
        # torchtitan 0.2.2 leaves a router's gate bias (gpt_oss: gate_bias=True) as torch.empty:
        # NaN under debug.deterministic (which fills uninitialized memory), garbage otherwise.
        # Later torchtitan zeroes it; so does this, on every device.
        if self.gate.bias is not None:
            torch.nn.init.zeros_(self.gate.bias)
            if not said:  # one start-up line, not one per layer
                said.append(True)
                logging.getLogger().info(ROUTER_BIAS_NOTE)

    return wrapped


def install() -> None:
    """gpt_oss's router bias starts at zero, not uninitialized memory (see _router_bias_initialized)."""
    from torchtitan.models.moe import moe

    moe.TokenChoiceTopKRouter.init_weights = _router_bias_initialized(moe.TokenChoiceTopKRouter.init_weights)
