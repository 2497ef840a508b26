"""The kernel library's rules, each in one place: the loss options (validated once, passed
by name at the op boundary) and the backend choice (the chunk plan and its cap: plan.py).
Callers with their own configuration (parallel/config.py) check through these functions."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("sum", "mean", "none")


def triton_interpreted() -> bool:
    """Triton kernels run in its interpreter (numpy), chosen by TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_backend(backend: str, device_type: str) -> str:
    """The backend that runs for tensors on `device_type` ("auto": triton on CUDA, else torch).

    "triton" needs CUDA, or the Triton interpreter (TRITON_INTERPRET=1) on other devices.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if backend == "triton" and device_type != "cuda" and not triton_interpreted():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device_type}); use "
                         "backend='torch' or 'auto', or set TRITON_INTERPRET=1 for the "
                         "(slow) Triton interpreter")
    return backend


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """What the row kernels need to know about the loss (not about the tensors).

    At the custom ops' boundary these travel as keyword arguments of the same names
    (`to_op_args` / `from_op_args`): by name, never by position.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None  # None: no softcap (the one "off")
    vocab_start: int = 0
    vocab_size: int = 0  # the global vocabulary, over all ranks of the group

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing:g}")
        if self.z_loss < 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss:g}")
        if self.logit_softcap is not None and not self.logit_softcap > 0.0:
            raise ValueError(f"logit_softcap must be > 0 (None: no softcap), got "
                             f"{self.logit_softcap:g}")
        if self.vocab_start < 0:
            raise ValueError(f"vocab_start must be >= 0, got {self.vocab_start}")

    def to_op_args(self) -> dict:
        """The options as the custom ops' keyword arguments (the same names); the fields are
        scalars, so no copying (dataclasses.asdict deep-copies: ~30 us per call)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_op_args(cls, args: Mapping[str, Any]) -> LossOptions:
        """The options back from a mapping of the ops' arguments (others are ignored)."""
        return cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})

