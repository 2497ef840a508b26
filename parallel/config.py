"""The `[fused_ce]` TOML section, merged into torchtitan's JobConfig.

run_train.sh passes `--job.custom_config_module=parallel.config`; torchtitan's
ConfigManager then merges `JobConfig` below into its own, so `[fused_ce]` works
in the TOML and `--fused_ce.*` on the command line (CLI > TOML > defaults).

torchtitan drops `__post_init__` of a custom config during the merge, so the
values are checked by `validate()`, which the trainer calls before anything
distributed exists.
"""

from dataclasses import dataclass, field

from fused_loss.options import BACKENDS, LossOptions


@dataclass
class FusedCE:
    enable: bool = False
    """Compute the LM head and cross-entropy with the fused op (never materializes logits)."""

    backend: str = "auto"
    """Kernel backend: auto (triton on GPU, torch on CPU), triton or torch."""

    chunk_size: int = 0
    """Tokens per chunk; 0 sizes the chunk from chunk_budget_mib."""

    chunk_budget_mib: int = 1024
    """Memory budget in MiB for one [chunk, local vocab] logits buffer."""

    z_loss: float = 0.0
    """Coefficient of the z-loss term (logsumexp**2) added to the loss; 0 = off."""

    label_smoothing: float = 0.0
    """Label smoothing in [0, 1), as in torch.nn.functional.cross_entropy."""

    logit_softcap: float = 0.0
    """Soft-cap logits as cap*tanh(logit/cap); 0 = off."""

    check_labels: bool = True
    """Refuse a batch whose labels fall outside [0, vocab_size) (checked on the CPU copy, no device sync)."""

    weight_grad_fp32: bool = True
    """Carry the head's weight gradient across chunks in fp32 (as accurate as eager; V_local*D*2
    bytes more than dW itself until the backward); off: a bf16 carry, faster and leaner, one
    rounding per chunk."""


@dataclass
class JobConfig:
    fused_ce: FusedCE = field(default_factory=FusedCE)


def validate(cfg: FusedCE, vocab_size: int, tp_degree: int) -> None:
    """Raise ValueError naming the `[fused_ce]` key at fault."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"[fused_ce] backend must be one of {', '.join(BACKENDS)}; got {cfg.backend!r}")
    if cfg.logit_softcap < 0:  # the TOML has no None: 0 is off
        raise ValueError(f"[fused_ce] logit_softcap must be >= 0 (0 = off), got {cfg.logit_softcap:g}")
    try:  # the kernel library's own checks of the loss options, under the TOML key names
        LossOptions(label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                    logit_softcap=cfg.logit_softcap or None)
    except ValueError as e:
        raise ValueError(f"[fused_ce] {e}") from None
    if cfg.chunk_size < 0:
        raise ValueError(f"[fused_ce] chunk_size must be >= 0 (0 = from chunk_budget_mib), got {cfg.chunk_size}")
    # One fp32 row of the [chunk, V_local] buffer is the least a chunk can hold.
    v_local = -(-vocab_size // tp_degree)
    row_bytes = v_local * 4
    if cfg.chunk_size == 0 and cfg.chunk_budget_mib * 2**20 < row_bytes:
        raise ValueError(
            f"[fused_ce] chunk_budget_mib={cfg.chunk_budget_mib} is too small for one row of "
            f"{v_local} local vocab entries ({row_bytes} bytes); raise it or set chunk_size"
        )
