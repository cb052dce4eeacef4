"""Sparse attention, the readable way: dense attention with the pattern as a token mask.

Every (query, key) score is still computed, so time and memory stay O(T^2); the pattern only
decides which scores survive the softmax. This is the reference the block-sparse ``fast.py``
must reproduce.
"""

from __future__ import annotations

import math

import torch

from impl.sparse_attention.patterns import check_layout, expand_layout, num_blocks


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool,
    block_bias: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + bias, masked by the pattern) v, as a dense masked product.

    q: (B, nh, T, hs); k, v: (B, nh, S, hs) with T <= S. The pattern covers the S keys:
    ``layout`` is bool (n, n) or (B, nh, n, n) with n = ceil(S / block_size). When T < S the
    queries are the last T positions (decoding after a KV cache), as in impl.gpt.attention.
    ``block_bias`` (broadcastable to (B, nh, n, n)) is added to every score of a block pair; the
    learned pattern uses it to pass gradient to its router. ``key_valid`` (None or bool (B, S),
    False = padding key) hides padding keys as ``impl.gpt.attention.visibility`` does: a query
    still sees its own position, which the pattern always keeps (diagonal block, and causal
    allows it). Returns y: (B, nh, T, hs).
    """
    T, S, hs = q.shape[2], k.shape[2], q.shape[3]
    if T > S:
        raise ValueError(f"sparse attention needs T <= S queries, got T={T} and S={S}")
    check_layout(layout, num_blocks(S, block_size))
    mask = expand_layout(layout.to(q.device), block_size, S, causal)[..., S - T :, :]  # (..., T, S)
    if key_valid is not None:
        own = torch.arange(S, device=q.device) == torch.arange(S - T, S, device=q.device).unsqueeze(1)  # (T, S)
        mask = mask & (key_valid.to(device=q.device, dtype=torch.bool)[:, None, None, :] | own)  # (B, ., T, S)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, S)
    if block_bias is not None:
        bias = block_bias.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
        scores = scores + bias[..., S - T : S, :S]
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v  # (B, nh, T, hs)
