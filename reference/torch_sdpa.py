"""torch's fused ``scaled_dot_product_attention`` behind our attention signature.

``attend(q, k, v, causal) -> y`` with q (B, nh, T, hs), k/v (B, nh, S, hs), S >= T and a causal
mask aligned bottom-right (query i sees keys 0 .. S - T + i). The mask comes from torch's own
``causal_lower_right`` bias, not from our code, so the reference shares nothing with ``impl/``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA output (B, nh, T, hs); torch picks its fused flash / memory-efficient kernel where it can."""
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))


def attention_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of SDPA for the upstream gradient ``dy`` (B, nh, T, hs), by autograd."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        return torch.autograd.grad(attention(q, k, v, causal), (q, k, v), dy)
