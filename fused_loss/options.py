"""The kernel library's rules, each in one place: the loss options (validated once, passed
by name at the op boundary), the backend choice, and the chunk plan and its budget.
Callers with their own configuration (parallel/config.py) check through these functions."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("sum", "mean", "none")
DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30  # one [chunk, V_local] logits buffer; see README "Memory"
WIDEST_ELEMENT_SIZE = 4  # fp32: the widest dtype the op takes


def pick_backend(backend: str, device_type: str) -> str:
    """The backend that runs for tensors on `device_type` ("auto": triton on CUDA, else torch).

    "triton" needs CUDA, or the Triton interpreter (TRITON_INTERPRET=1) on other devices.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if device_type == "cuda" else "torch"
    if backend == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device_type}); use "
                         "backend='torch' or 'auto', or set TRITON_INTERPRET=1 for the "
                         "(slow) Triton interpreter")
    return backend


def check_chunk_budget(chunk_budget_bytes: int, v_local: int,
                       element_size: int = WIDEST_ELEMENT_SIZE) -> None:
    """A chunk budget must hold one row of [V_local] logits (by default in the widest dtype,
    so that a budget that passes holds a row whatever dtype the op later runs in)."""
    row_bytes = v_local * element_size
    if chunk_budget_bytes < row_bytes:
        raise ValueError(
            f"chunk_budget_bytes={chunk_budget_bytes} is smaller than one row of logits "
            f"({v_local} x {element_size} B = {row_bytes} B)")


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
        """The options as the custom ops' keyword arguments (the same names)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_op_args(cls, args: Mapping[str, Any]) -> LossOptions:
        """The options back from a mapping of the ops' arguments (others are ignored)."""
        return cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})


def chunk_rows(n_rows: int, v_local: int, element_size: int, chunk_size: int | None,
               chunk_budget_bytes: int | None) -> int:
    """Rows per chunk: an explicit chunk_size, else as many rows as the budget holds.

    The chunks are then balanced (N=16384 with a 3500-row budget gives 5 chunks of 3328, not
    4 of 3500 plus one of 2384) and rounded up to 128 rows so the GEMMs keep full tiles.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return max(1, min(chunk_size, n_rows))
    budget = DEFAULT_CHUNK_BUDGET_BYTES if chunk_budget_bytes is None else chunk_budget_bytes
    check_chunk_budget(budget, v_local, element_size)
    most = budget // (v_local * element_size)
    if n_rows <= most:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // most)
    rows = -(-n_rows // n_chunks)
    rounded = -(-rows // 128) * 128
    return rounded if rounded <= most else rows
