"""The attention FlashAttention replaces: the whole (T, S) score matrix, built at once.

The forward pass itself is the shared ``impl.gpt.attention.naive_attention``. This module adds
what the tiled versions also produce, so they can be checked against the textbook: the row
log-sum-exp of the scores (the one number per query a tiled backward needs), and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from impl.gpt.attention import naive_attention, visibility

Attend = Callable[..., torch.Tensor]  # (q, k, v, causal[, key_valid]) -> y


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, nh, T, hs) and row log-sum-exp (B, nh, T) of softmax(q k^T / sqrt(hs)) v.

    q: (B, nh, T, hs), k, v: (B, nh, S, hs); the causal mask is bottom-right aligned.
    ``key_valid``: None or bool (B, S), padding keys hidden as in ``impl.gpt.attention.visibility``.
    """
    T, S, hs = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, S)
    mask = visibility(T, S, key_valid, causal, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, nh, T)
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse


def grads_of(
    attend: Attend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    dy: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``attend`` for the upstream gradient ``dy`` (B, nh, T, hs), by autograd;
    ``key_valid`` (padding mask) is passed on only when given, so 4-argument backends still fit."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        y = attend(q, k, v, causal) if key_valid is None else attend(q, k, v, causal, key_valid)
        dq, dk, dv = torch.autograd.grad(y, (q, k, v), dy)
    return dq, dk, dv


def attention_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    dy: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the textbook attention: autograd through the full score matrix."""
    return grads_of(naive_attention, q, k, v, causal, dy, key_valid)
