"""The attention FlashAttention replaces: the whole (T, S) score matrix, built at once.

The forward pass itself is the shared ``impl.gpt.attention.naive_attention``. This module adds
what the tiled versions also produce, so they can be checked against the textbook: the row
log-sum-exp of the scores (the one number per query a tiled backward needs), and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from impl.gpt.attention import causal_mask, naive_attention

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, nh, T, hs) and row log-sum-exp (B, nh, T) of softmax(q k^T / sqrt(hs)) v.

    q: (B, nh, T, hs), k, v: (B, nh, S, hs); the causal mask is bottom-right aligned.
    """
    T, S, hs = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, nh, T)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def grads_of(
    attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``attend`` for the upstream gradient ``dy`` (B, nh, T, hs), by autograd."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        y = attend(q, k, v, causal)
        dq, dk, dv = torch.autograd.grad(y, (q, k, v), dy)
    return dq, dk, dv


def attention_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the textbook attention: autograd through the full score matrix."""
    return grads_of(naive_attention, q, k, v, causal, dy)
