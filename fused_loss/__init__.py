"""Fused linear + cross-entropy that never materializes the [tokens, vocab] logits.

Depends on torch (and triton on CUDA) only. See `fused_linear_cross_entropy` for the options.
"""

from .api import FusedCEAux, FusedLinearCrossEntropy, fused_linear_cross_entropy
from .chunked import check_label_range

__all__ = ["FusedCEAux", "FusedLinearCrossEntropy", "check_label_range",
           "fused_linear_cross_entropy"]
