"""The `[fused_ce]` TOML section, merged into torchtitan's JobConfig.

run_train.sh passes `--job.custom_config_module=parallel.config`; torchtitan's
ConfigManager then merges `JobConfig` below into its own, so `[fused_ce]` works
in the TOML and `--fused_ce.*` on the command line (CLI > TOML > defaults).

torchtitan drops `__post_init__` of a custom config during the merge, so the
values are checked by `validate()`, which the trainer calls before anything
distributed exists.
"""

from dataclasses import dataclass, field

import torch

from fused_loss import (DEFAULT_CHUNK_BUDGET_BYTES, LossOptions, check_chunk_budget,
                        group_v_local, pick_backend)


@dataclass
class FusedCE:
    # One line per help text: tyro keeps a docstring's line breaks, which would break --help mid-phrase.
    enable: bool = False
    """Compute the LM head and cross-entropy with one fused op that never materializes the logits."""

    backend: str = "auto"
    """Kernel: auto (triton on GPU, torch on CPU), triton (needs CUDA) or torch."""

    chunk_size: int = 0
    """Tokens per chunk; 0 = planned per call under chunk_budget_mib."""

    chunk_budget_mib: int = DEFAULT_CHUNK_BUDGET_BYTES // 2**20
    """Cap in MiB on one [chunk, local vocab] logits buffer (fewer, larger chunks where they hold no more memory in all)."""

    z_loss: float = 0.0
    """Coefficient of the z-loss term (logsumexp**2) added to the loss; 0 = off."""

    label_smoothing: float = 0.0
    """Label smoothing in [0, 1), as in torch.nn.functional.cross_entropy."""

    logit_softcap: float = 0.0
    """Soft-cap the logits as cap * tanh(logit / cap); 0 = off."""

    check_labels: bool = True
    """Refuse a batch whose labels fall outside [0, vocab_size) (checked on the CPU copy: no device sync)."""

    weight_grad_fp32: bool = True
    """Carry the weight gradient across chunks in fp32 (eager's accuracy, V_local*D*2 bytes more); off: bf16, faster, leaner."""

    fp32_statistics: bool = False
    """Statistics and gradient rows from the fp32 product, not 16-bit logits: on LM-like logits loss error 0.05-0.85x, gradients ~0.2x eager's; on Hopper a Gluon GEMM epilogue at the default's time and memory (benchmarks/RESULTS.md)."""


@dataclass
class JobConfig:
    fused_ce: FusedCE = field(default_factory=FusedCE)


def kernel_options(cfg: FusedCE) -> dict:
    """The section as `fused_linear_cross_entropy`'s keyword arguments. The TOML has no None,
    so there 0 means off (logit_softcap) or "from the budget" (chunk_size); here it becomes
    the kernel's None, and a negative value is an error naming the key."""
    for key, zero in (("logit_softcap", "off"), ("chunk_size", "planned under chunk_budget_mib")):
        if getattr(cfg, key) < 0:
            raise ValueError(f"fused_ce.{key} must be >= 0 (0 = {zero}), got {getattr(cfg, key):g}")
    if cfg.chunk_budget_mib <= 0:
        raise ValueError(f"fused_ce.chunk_budget_mib must be a positive number of MiB, got {cfg.chunk_budget_mib}")
    return dict(
        label_smoothing=cfg.label_smoothing,
        z_loss=cfg.z_loss,
        logit_softcap=cfg.logit_softcap or None,
        backend=cfg.backend,
        chunk_size=cfg.chunk_size or None,
        chunk_budget_bytes=cfg.chunk_budget_mib * 2**20,
        weight_grad_fp32=cfg.weight_grad_fp32,
        fp32_statistics=cfg.fp32_statistics,
    )


def _device_type() -> str:
    """The device the job's tensors will live on (what the kernel picks its backend for)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def validate(cfg: FusedCE, vocab_size: int, tp_degree: int) -> None:
    """Raise ValueError naming the `[fused_ce]` key at fault: the kernel library's own rules
    (`fused_loss.pick_backend`, `LossOptions`, `check_chunk_budget`), under the TOML's names."""
    options = kernel_options(cfg)
    try:
        pick_backend(cfg.backend, _device_type())
        LossOptions(label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss,
                    logit_softcap=options["logit_softcap"])
    except ValueError as e:  # the kernel's message starts with the option's name
        raise ValueError(f"fused_ce.{e}") from None
    if options["chunk_size"] is None:
        v_local = group_v_local(vocab_size, vocab_size, tp_degree)  # what every TP rank plans with
        try:
            check_chunk_budget(options["chunk_budget_bytes"], v_local)
        except ValueError as e:
            raise ValueError(f"fused_ce.chunk_budget_mib={cfg.chunk_budget_mib} is too small "
                             f"for one row: {e}; raise it or set fused_ce.chunk_size") from None


if __name__ == "__main__":
    # run_train.sh --help shows these first: torchtitan's own help lists them last, ~900 lines down.
    import tyro

    tyro.cli(JobConfig, prog="run_train.sh",
             description="The fused head's options, --fused_ce.<key> here or <key> under [fused_ce] in the "
                         "TOML; torchtitan's options follow below.")
