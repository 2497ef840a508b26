"""Fused linear + cross-entropy that never materializes the [tokens, vocab] logits.

Depends on torch (and triton on CUDA) only. See `fused_linear_cross_entropy` for the options.
The rules a configuration layer checks at start-up (backend, loss options, chunk budget) are
exported too, so that they are checked by the same code that applies them, and so is the
chunk plan (`plan_chunks`: the rows, the dW carry, the cost model's time and memory).
"""

from .api import FusedCEAux, FusedLinearCrossEntropy, fused_linear_cross_entropy
from .chunked import check_label_range
from .options import BACKENDS, LossOptions, pick_backend
from .plan import (DEFAULT_CHUNK_BUDGET_BYTES, ChunkPlan, check_chunk_budget, group_v_local,
                   plan_chunks)

__all__ = ["BACKENDS", "DEFAULT_CHUNK_BUDGET_BYTES", "ChunkPlan", "FusedCEAux",
           "FusedLinearCrossEntropy", "LossOptions", "check_chunk_budget", "check_label_range",
           "fused_linear_cross_entropy", "group_v_local", "pick_backend", "plan_chunks"]
