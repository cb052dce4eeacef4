"""The baseline memory-efficient attention improves on: one pass over the whole (T, S) matrix.

This is the shared ``impl.gpt.attention.naive_attention`` given the call signature of the
chunked and split-K versions, so that all of them can be run on the same cases: ``num_splits``
is the knob this version does not have (it always uses one piece). For decoding it is the
"unsplit" baseline: one query token against the whole KV cache in one go.
"""

from __future__ import annotations

import torch

from impl.flash_attention.naive import attention_with_lse
from impl.gpt.attention import naive_attention

__all__ = ["attention", "attention_with_lse"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int = 1,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v (B, nh, T, hs) from the full score matrix; ``num_splits`` is ignored,
    ``key_valid`` (None or bool (B, S)) hides padding keys."""
    return naive_attention(q, k, v, causal, key_valid)
