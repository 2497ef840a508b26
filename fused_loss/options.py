"""The loss options shared by every backend, validated once, hashable for the op boundary."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("sum", "mean", "none")
DEFAULT_CHUNK_BUDGET_BYTES = 1 << 30  # one [chunk, V_local] logits buffer; see README "Memory"


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
    row_bytes = v_local * element_size
    if budget < row_bytes:
        raise ValueError(
            f"chunk_budget_bytes={budget} is smaller than one row of logits "
            f"({v_local} x {element_size} B = {row_bytes} B)")
    most = budget // row_bytes
    if n_rows <= most:
        return max(n_rows, 1)
    n_chunks = -(-n_rows // most)
    rows = -(-n_rows // n_chunks)
    rounded = -(-rows // 128) * 128
    return rounded if rounded <= most else rows
