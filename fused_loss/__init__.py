"""Fused linear + cross-entropy that never materializes the [tokens, vocab] logits.

Depends on torch (and triton on CUDA) only. See `fused_linear_cross_entropy` for the options.
The rules a configuration layer checks at start-up (backend, loss options, chunk budget) are
exported too, so that they are checked by the same code that applies them.
"""

from .api import FusedCEAux, FusedLinearCrossEntropy, fused_linear_cross_entropy
from .chunked import check_label_range
from .options import (BACKENDS, DEFAULT_CHUNK_BUDGET_BYTES, LossOptions, check_chunk_budget,
                      chunk_rows, pick_backend)

__all__ = ["BACKENDS", "DEFAULT_CHUNK_BUDGET_BYTES", "FusedCEAux", "FusedLinearCrossEntropy",
           "LossOptions", "check_chunk_budget", "check_label_range", "chunk_rows",
           "fused_linear_cross_entropy", "pick_backend"]
