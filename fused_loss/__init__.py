"""Fused linear + cross-entropy that never materializes the [tokens, vocab] logits.

Depends on torch (and triton on CUDA) only. See `fused_linear_cross_entropy` for the options.
"""

from .api import FusedCEAux, FusedLinearCrossEntropy, fused_linear_cross_entropy

__all__ = ["FusedCEAux", "FusedLinearCrossEntropy", "fused_linear_cross_entropy"]
