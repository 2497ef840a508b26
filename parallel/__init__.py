"""torchtitan integration of the fused linear + cross-entropy loss (see README)."""
