"""Attention backends: the seam where later projects plug in flash, sparse, split-K, paged ...

Every backend has one signature::

    attend(q, k, v, causal) -> y
    q: (B, nh, T, hs)   k, v: (B, nh, S, hs) with S >= T   y: (B, nh, T, hs)

The T queries are the *last* T positions of the S keys (decoding with a KV cache), so the
causal mask is aligned bottom-right: query i may see keys 0 .. S - T + i.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]

_BACKENDS: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn) -> None:
    """Make ``fn`` selectable as ``GPTConfig(attention=name)``."""
    _BACKENDS[name] = fn


def get_attention(name: str) -> AttentionFn:
    """The backend registered under ``name``; a clear error lists the known ones."""
    if name not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"unknown attention backend {name!r}; known backends: {known}")
    return _BACKENDS[name]


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may attend key j (bottom-right aligned)."""
    rows = torch.arange(T, device=device).unsqueeze(1) + (S - T)
    cols = torch.arange(S, device=device).unsqueeze(0)
    return cols <= rows


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The textbook version: one head at a time, explicit mask, explicit softmax."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    mask = causal_mask(T, S, q.device) if causal else None
    heads = []
    for h in range(nh):
        scores = q[:, h] @ k[:, h].transpose(-2, -1) / math.sqrt(hs)  # (B, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        heads.append(weights @ v[:, h])  # (B, T, hs)
    return torch.stack(heads, dim=1)  # (B, nh, T, hs)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient kernels where available)."""
    T, S = q.shape[2], k.shape[2]
    if not causal or T == 1:
        # one new query token may see every cached key: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal is top-left aligned; a chunk of queries after a cache needs bottom-right
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device))


register_attention("naive", naive_attention)
register_attention("sdpa", sdpa_attention)
