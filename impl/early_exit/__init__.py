"""Project 27: early exit. ``heads`` (exit heads, confidence, a skipped layer's K/V), ``train``
(self-distillation of the heads from the final layer, cached), ``naive`` / ``fast`` (early-exit greedy
generation with the KV cache kept full: CALM's copy-the-exit-state-up)."""
