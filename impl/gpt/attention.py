"""Attention backends: the seam where later projects plug in flash, sparse, split-K, paged ...

Every backend has one signature::

    attend(q, k, v, causal, key_valid=None) -> y
    q: (B, nh, T, hs)   k, v: (B, nh, S, hs) with S >= T   y: (B, nh, T, hs)
    key_valid: None, or bool (B, S): False marks a padding key no query may see

The T queries are the *last* T positions of the S keys (decoding with a KV cache), so the
causal mask is aligned bottom-right: query i may see keys 0 .. S - T + i.

Ragged batches (prompts of different lengths padded to one length, left or right) pass
``key_valid``. Query i of row b then sees key j when the causal rule allows it and key j is
valid, **or j is query i's own position**: a padding query (left padding: nothing valid before
it) would otherwise see no key at all and softmax over nothing is NaN. A valid query's own key
is valid, so the exception only ever touches padding rows, whose outputs nobody reads.
``visibility(T, S, key_valid)`` is that rule as one boolean tensor; every backend follows it.

Packed rows (several training examples concatenated in one row, P4) pass ``key_valid`` as
integer **segment ids** (B, S) instead: 0 marks padding, 1, 2, ... number the examples, each one
contiguous run. Query i then sees key j when the causal rule allows it and both carry the same
nonzero segment (or j is i's own position): no example attends to another. Backends registered
with ``segments=True`` (naive, sdpa: both build their mask with ``visibility``) accept them;
``GPT`` refuses packed rows on any other backend rather than let a per-key mask leak across
examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, causal, key_valid=None) -> y

_BACKENDS: dict[str, AttentionFn] = {}
_SEGMENT_AWARE: set[AttentionFn] = set()


def register_attention(name: str, fn: AttentionFn, *, segments: bool = False) -> None:
    """Make ``fn`` selectable as ``GPTConfig(attention=name)``; ``segments=True`` declares that it
    follows ``visibility`` for integer segment ids too (packed rows)."""
    _BACKENDS[name] = fn
    if segments:
        _SEGMENT_AWARE.add(fn)


def supports_segments(fn: AttentionFn) -> bool:
    """Whether backend ``fn`` keeps packed examples apart when ``key_valid`` holds segment ids."""
    return fn in _SEGMENT_AWARE


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


def visibility(T: int, S: int, key_valid: torch.Tensor | None, causal: bool = True,
               device: torch.device | None = None) -> torch.Tensor | None:
    """Boolean mask of which keys each query sees: (T, S) without ``key_valid``, (B, 1, T, S) with
    it (a bool padding mask, or integer segment ids of packed rows); None when every query sees
    every key (no causal mask, no padding)."""
    if key_valid is None:
        return causal_mask(T, S, device) if causal else None
    device = key_valid.device
    if key_valid.dtype == torch.bool:
        allowed = key_valid[:, None, None, :]  # (B, 1, 1, S)
    else:  # segment ids: a key is visible to the queries of its own (nonzero) segment
        keys, queries = key_valid[:, None, None, :], key_valid[:, None, S - T:, None]
        allowed = (keys == queries) & (keys != 0)  # (B, 1, T, S)
    if causal:
        allowed = allowed & causal_mask(T, S, device)
    own = torch.arange(S, device=device).unsqueeze(0) == (torch.arange(T, device=device).unsqueeze(1) + S - T)
    return allowed | own  # a padding query sees at least itself: no softmax over nothing


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook version: one head at a time, explicit mask, explicit softmax."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    mask = visibility(T, S, key_valid, causal, q.device)
    if mask is not None and mask.dim() == 4:
        mask = mask[:, 0]  # (B, T, S): one head at a time below
    heads = []
    for h in range(nh):
        scores = q[:, h] @ k[:, h].transpose(-2, -1) / math.sqrt(hs)  # (B, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        heads.append(weights @ v[:, h])  # (B, T, hs)
    return torch.stack(heads, dim=1)  # (B, nh, T, hs)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient kernels where available)."""
    T, S = q.shape[2], k.shape[2]
    if key_valid is not None:  # ragged batch: one boolean mask per row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visibility(T, S, key_valid, causal))
    if not causal or T == 1:
        # one new query token may see every cached key: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # SDPA's is_causal is top-left aligned; a chunk of queries after a cache needs bottom-right
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device))


register_attention("naive", naive_attention, segments=True)
register_attention("sdpa", sdpa_attention, segments=True)
