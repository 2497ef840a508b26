"""parallelize_fn and pipelining_fn of the `llama3_fused_ce` train spec.

With `[fused_ce] enable` off both are torchtitan's llama3 functions, unchanged.
"""

from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3 import parallelize_llama
from torchtitan.tools.logging import logger

from parallel.fused_head import FusedLMHead

PP_REFUSAL = (
    "[fused_ce] enable=true does not support pipeline parallelism "
    "(parallelism.pipeline_parallel_degree={degree}). Turn one of them off: "
    "--fused_ce.no-enable, or --parallelism.pipeline_parallel_degree 1."
)


def parallelize(model, parallel_dims, job_config):
    if job_config.fused_ce.enable:
        # Swap the head on the meta model before TP/FSDP see it, so that torchtitan's
        # plans (ColwiseParallel for `output`, the [norm, output] FSDP unit) apply to it.
        model.output = FusedLMHead(model.output, job_config.fused_ce)
        # loss_parallel shards logits; the fused head never makes logits and is
        # vocab-parallel by itself. The trainer reads this flag after parallelize.
        if parallel_dims.tp_enabled and not job_config.parallelism.disable_loss_parallel:
            logger.info("[fused_ce] loss_parallel is off: the fused head is vocab-parallel itself")
        job_config.parallelism.disable_loss_parallel = True
    return parallelize_llama(model, parallel_dims, job_config)


def pipelining(model, parallel_dims, job_config, *args, **kwargs):
    """Backstop for launches that bypass parallel.train's start-up check."""
    if job_config.fused_ce.enable:
        raise ValueError(PP_REFUSAL.format(degree=job_config.parallelism.pipeline_parallel_degree))
    return pipeline_llm(model, parallel_dims, job_config, *args, **kwargs)
