"""The fused head for every torchtitan text decoder, by one mechanism.

Every decoder torchtitan 0.2.2 ships (llama3, llama4, qwen3, deepseek_v3,
gpt_oss) ends its forward with `output = self.output(self.norm(h))`, and its
TP and FSDP plans name `output`. `fused_train_spec` derives, from a family's
own TrainSpec, one that differs only where `[fused_ce] enable` is on:

- `parallelize_fn` swaps `model.output` for a `FusedLMHead` (same Parameter,
  same name `output.weight`), then runs the family's own parallelize function;
- `build_loss_fn` returns `FusedCELoss`: the model's forward already called the
  head, which computed the sum loss from the hidden states;
- `pipelining_fn` refuses pipeline parallelism (the trainer refuses it earlier).

Model classes, flavors, TP plans, FSDP grouping, MoE handling, optimizers,
float8/compile options and state-dict adapters stay the family's own. With the
fused head off every function is the family's, unchanged.

`register_train_specs()` registers the derived spec under each family's own
name (torchtitan looks up registered specs first), plus the flavors below and
the old `llama3_fused_ce` name; `parallel.train` calls it before the trainer.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from torchtitan.models.deepseek_v3 import deepseekv3_args
from torchtitan.models.gpt_oss import gptoss_configs
from torchtitan.models.llama3 import TransformerModelArgs as Llama3Args
from torchtitan.models.llama4 import llama4_args
from torchtitan.models.moe import MoEArgs
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec, TrainSpec
from torchtitan.tools.logging import logger

from parallel.fused_head import FusedCELoss, FusedLMHead

FAMILIES = ("llama3", "llama4", "qwen3", "deepseek_v3", "gpt_oss")
ALIASES = {"llama3_fused_ce": "llama3"}  # the name this project used before it served every family

PP_REFUSAL = (
    "fused_ce.enable=true does not support pipeline parallelism "
    "(parallelism.pipeline_parallel_degree={degree}). Turn one of them off: "
    "--fused_ce.no-enable, or --parallelism.pipeline_parallel_degree 1."
)

# Flavors with a real vocabulary that train on one GPU (qwen3's stock 1.7B already does).
EXTRA_FLAVORS = {
    "llama3": {
        # Llama-3.2-1B shapes. FFN hidden: int(1.5 * int(2 * 4 * 2048 / 3)) = 8191 -> 8192.
        "1B": Llama3Args(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                         multiple_of=256, vocab_size=128256, rope_theta=500000),
    },
    "llama4": {
        # 0.87B: Llama 4's 202048-entry vocabulary, 16 layers of dim 1024, 8 experts every 2nd layer.
        "1Bx8e": dataclasses.replace(llama4_args["debugmodel"], dim=1024, n_layers=16, n_heads=16,
                                     n_kv_heads=8, vocab_size=202048,
                                     moe_args=MoEArgs(num_experts=8)),
    },
    "deepseek_v3": {
        # 0.88B: DeepSeek-V3's 129280-entry vocabulary, 16 layers of dim 1024 (1 dense), 8 routed
        # + 2 shared experts, multi-head latent attention.
        "1B": dataclasses.replace(deepseekv3_args["debugmodel"], vocab_size=129280, dim=1024,
                                  n_layers=16, inter_dim=4096, moe_inter_dim=1024),
    },
    "gpt_oss": {
        # 0.83B: gpt-oss's 201088-entry vocabulary, 12 layers of dim 1024, 8 experts.
        "1b": dataclasses.replace(gptoss_configs["debugmodel"], dim=1024, n_layers=12,
                                  moe_inter_dim=1024),
    },
}


class JobRefused(ValueError):
    """A job `[fused_ce]` cannot run; the message names the setting at fault."""


def fused_train_spec(spec: TrainSpec, flavors: dict | None = None) -> TrainSpec:
    """`spec` with the fused head where `[fused_ce] enable` is on (see the module docstring)."""
    return dataclasses.replace(
        spec,
        model_args={**spec.model_args, **(flavors or {})},
        parallelize_fn=functools.partial(_parallelize, spec.parallelize_fn),
        build_loss_fn=functools.partial(_build_loss, spec.build_loss_fn),
        pipelining_fn=spec.pipelining_fn and functools.partial(_pipelining, spec.pipelining_fn),
    )


def _parallelize(parallelize_fn, model, parallel_dims, job_config):
    if job_config.fused_ce.enable:
        # Swap the head on the meta model before TP/FSDP see it, so that the family's plans
        # (ColwiseParallel for `output`, the [norm, output] FSDP unit) apply to it.
        model.output = FusedLMHead(model.output, job_config.fused_ce)
        # loss_parallel shards logits; the fused head makes none and is vocab-parallel by
        # itself. The trainer reads this flag after parallelize.
        if parallel_dims.tp_enabled and not job_config.parallelism.disable_loss_parallel:
            logger.info("[fused_ce] loss_parallel is off: the fused head is vocab-parallel itself")
        job_config.parallelism.disable_loss_parallel = True
    return parallelize_fn(model, parallel_dims, job_config)


def _build_loss(build_loss_fn, job_config, **kwargs):
    if job_config.fused_ce.enable:
        # Not compiled even with compile.components=["loss"]: the fused op is one opaque custom op.
        return FusedCELoss()
    return build_loss_fn(job_config, **kwargs)


def _pipelining(pipelining_fn, model, parallel_dims, job_config, *args, **kwargs):
    """Backstop for launches that bypass parallel.train's start-up check."""
    if job_config.fused_ce.enable:
        raise ValueError(PP_REFUSAL.format(degree=job_config.parallelism.pipeline_parallel_degree))
    return pipelining_fn(model, parallel_dims, job_config, *args, **kwargs)


@functools.cache
def register_train_specs() -> None:
    """Register the fused spec of every family under its own name (once per process)."""
    for name in FAMILIES:
        register_train_spec(name, fused_train_spec(get_train_spec(name), EXTRA_FLAVORS.get(name)))
    for alias, name in ALIASES.items():
        register_train_spec(alias, get_train_spec(name))


def model_args_of(model_name: str, flavor: str):
    """The model args `model.name` and `model.flavor` name (with the fused head on or off);
    JobRefused naming the setting at fault and what it could be."""
    register_train_specs()
    try:
        spec = get_train_spec(model_name)
    except ValueError:  # torchtitan's "TrainSpec ... is not registered"
        from torchtitan.models import _supported_models

        others = sorted(set(_supported_models) - set(FAMILIES))
        raise JobRefused(f"model.name={model_name!r} is not a model torchtitan knows; the fused head "
                         f"serves {', '.join(FAMILIES)} (torchtitan also has {', '.join(others)})") from None
    except ImportError as e:
        raise JobRefused(f"model.name={model_name!r}: its train spec does not load "
                         f"({type(e).__name__}: {e})") from None
    if flavor not in spec.model_args:
        raise JobRefused(f"model.flavor {flavor!r} is not a flavor of model.name={model_name!r} "
                         f"(flavors: {', '.join(spec.model_args)})")
    return spec, spec.model_args[flavor]


def served_model_args(model_name: str, flavor: str):
    """The model args of a job the fused head serves; JobRefused naming what is missing.

    The spec must come from fused_train_spec; any other model is built on the meta
    device to say what it lacks.
    """
    spec, args = model_args_of(model_name, flavor)
    if isinstance(spec.parallelize_fn, functools.partial) and spec.parallelize_fn.func is _parallelize:
        return args
    try:
        with torch.device("meta"):
            model = spec.model_cls(args)
    except Exception as e:  # a model that needs more than its args to be built
        raise JobRefused(f"fused_ce.enable=true cannot serve model.name={model_name!r}: building it "
                         f"on the meta device to find its LM head failed ({type(e).__name__}: {e}); "
                         "register its spec through parallel.specs.fused_train_spec, or turn the "
                         "head off with --fused_ce.no-enable") from None
    head = getattr(model, "output", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        missing = ("an LM head `output` (nn.Linear(dim, vocab, bias=False)) ending its forward; it has "
                   + (f"`output` = {type(head).__name__}" if head is not None else "no `output`"))
    else:
        missing = ("a train spec derived by parallel.specs.fused_train_spec (served: "
                   f"{', '.join(FAMILIES)}); register yours that way")
    raise JobRefused(f"fused_ce.enable=true cannot serve model.name={model_name!r}: the fused head "
                     f"needs {missing}. Or turn it off with --fused_ce.no-enable.")
