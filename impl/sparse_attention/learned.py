"""A learnable sparse pattern: top-k block routing (in the spirit of MoBA / Routing Transformer).

Each block is summarised by one vector: keys by their mean over the block, queries by their mean
(non-causal) or by the block's *first* query (causal: a mean would let a token's choice depend
on later tokens of its own block; every token of the block comes at or after the first). A small
learnable projection scores query block i against key block j,

    score[i, j] = (q_i W_q) . (k_j W_k) / sqrt(d),

and each query block keeps its own (diagonal) block plus the ``top_k`` best-scoring other key
blocks (with ``causal``: only blocks j < i). The pattern differs per batch element and head:
the layout is (B, nh, n, n).

How it trains. Top-k is a hard choice with no gradient. We add ``score - score.detach()`` to the
attention logits of every kept off-diagonal block pair: the value is exactly zero (the forward
pass *is* plain sparse attention over the chosen blocks), but the backward pass sees a bias
whose gradient is the summed logit gradient of that block, i.e. "would attending more to this
block lower the loss?". This is a straight-through estimator; only kept blocks receive gradient
(as with top-k MoE routers), so a block is learned about once it has been picked.

Ragged batches (``key_valid`` (B, T), False = padding token) route on real tokens only: key
blocks are pooled over their valid keys, query blocks over their valid queries (causal: the
block's first valid query), a key block with no valid key is never picked, and the attention
then hides padding keys (``naive`` / ``fast``). What a padding token holds changes nothing for
the valid tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.sparse_attention import fast, naive
from impl.sparse_attention.patterns import num_blocks

SparseAttend = Callable[..., torch.Tensor]


def _block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over each block's real tokens: (B, nh, T, hs) -> (B, nh, n, hs)."""
    B, nh, T, hs = x.shape
    n = num_blocks(T, block_size)
    sums = F.pad(x, (0, 0, 0, n * block_size - T)).view(B, nh, n, block_size, hs).sum(3)
    tokens = (T - torch.arange(n, device=x.device) * block_size).clamp(max=block_size)  # last may be short
    return sums / tokens.unsqueeze(-1).to(x.dtype)


def _pooled_valid(
    q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor, block_size: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block summaries over valid tokens only: pooled queries, pooled keys (B, nh, n, hs), and which
    blocks hold a valid token (B, n). A block without one pools to zeros."""
    B, nh, T, hs = q.shape
    n = num_blocks(T, block_size)
    valid = F.pad(key_valid.to(device=q.device, dtype=torch.bool), (0, n * block_size - T)).view(B, n, block_size)
    has_valid = valid.any(-1)  # (B, n)
    weights = valid.to(q.dtype).view(B, 1, n, block_size, 1)
    counts = weights.sum(3).clamp(min=1)  # (B, 1, n, 1)

    def masked_means(x: torch.Tensor) -> torch.Tensor:
        blocks = F.pad(x, (0, 0, 0, n * block_size - T)).view(B, nh, n, block_size, hs)
        return (blocks * weights).sum(3) / counts

    if causal:  # the block's first valid query: every valid token of the block comes at or after it
        first = valid.to(torch.uint8).argmax(-1) + torch.arange(n, device=q.device) * block_size  # (B, n)
        pooled_q = q.gather(2, first.clamp(max=T - 1).view(B, 1, n, 1).expand(B, nh, n, hs))
        pooled_q = pooled_q * has_valid.view(B, 1, n, 1).to(q.dtype)
    else:
        pooled_q = masked_means(q)
    return pooled_q, masked_means(k), has_valid


def route_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned layout and its straight-through bias.

    q, k: (B, nh, T, hs); w_query, w_key: (hs, d). Returns ``layout`` bool (B, nh, n, n): the
    diagonal plus the top_k best-scoring candidate key blocks per query block, and ``bias``
    (B, nh, n, n): zero in value, carrying the router scores' gradient on kept candidate blocks.
    ``key_valid`` (None or bool (B, T)): pool over valid tokens only, never pick an all-padding block.
    """
    n = num_blocks(q.shape[2], block_size)
    if key_valid is None:
        pooled_q = q[:, :, ::block_size] if causal else _block_means(q, block_size)  # (B, nh, n, hs)
        pooled_k = _block_means(k, block_size)  # (B, nh, n, hs)
    else:
        pooled_q, pooled_k, has_valid = _pooled_valid(q, k, key_valid, block_size, causal)
    d = w_query.shape[1]
    scores = (pooled_q @ w_query) @ (pooled_k @ w_key).transpose(-2, -1) / math.sqrt(d)  # (B, nh, n, n)

    i = torch.arange(n, device=q.device).unsqueeze(1)
    j = i.transpose(0, 1)
    candidate = (j < i) if causal else (j != i)  # (n, n): the diagonal is always kept, never routed
    if key_valid is not None:
        candidate = candidate & has_valid.view(-1, 1, 1, n)  # (B, 1, n, n): no all-padding key block
    diagonal = i == j
    layout = diagonal.expand(scores.shape).clone()
    picks = min(top_k, n - 1)
    if picks > 0:
        top = scores.detach().masked_fill(~candidate, float("-inf")).topk(picks, dim=-1).indices
        # a row with fewer than top_k candidates also "picks" -inf slots: the AND drops them
        layout.scatter_(-1, top, True)
        layout &= candidate | diagonal
    bias = (scores - scores.detach()) * candidate  # straight-through: value 0, gradient of a bias
    return layout, bias


def learned_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool,
    attend: SparseAttend = fast.sparse_attention,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Route (``route_blocks``), then attend over the chosen blocks with ``attend`` (the
    block-sparse fast path by default). q, k, v: (B, nh, T, hs); ``key_valid`` None or bool (B, T)
    padding mask. Returns (B, nh, T, hs)."""
    layout, bias = route_blocks(q, k, w_query, w_key, block_size, top_k, causal, key_valid)
    if key_valid is None:
        return attend(q, k, v, layout, block_size, causal, block_bias=bias)
    return attend(q, k, v, layout, block_size, causal, block_bias=bias, key_valid=key_valid)


def learned_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_query: torch.Tensor, w_key: torch.Tensor,
    block_size: int, top_k: int, causal: bool, key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The learned pattern applied as a dense token mask (the reference). Returns (B, nh, T, hs)."""
    return learned_sparse_attention(
        q, k, v, w_query, w_key, block_size, top_k, causal, naive.sparse_attention, key_valid
    )


def learned_attention_fast(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_query: torch.Tensor, w_key: torch.Tensor,
    block_size: int, top_k: int, causal: bool, key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The learned pattern computed block-sparse (only the chosen blocks). Returns (B, nh, T, hs)."""
    return learned_sparse_attention(
        q, k, v, w_query, w_key, block_size, top_k, causal, fast.sparse_attention, key_valid
    )


class LearnedSparseAttention(nn.Module):
    """Top-k block routing as a module: owns the router projections ``w_query``, ``w_key``.

    They start as the identity (d = head_size), so before training the router ranks blocks by the
    dot product of pooled queries and keys: a cheap estimate of where attention mass lies.
    """

    def __init__(self, head_size: int, block_size: int, top_k: int, route_dim: int | None = None):
        super().__init__()
        d = route_dim or head_size
        self.block_size, self.top_k = block_size, top_k
        self.w_query = nn.Parameter(torch.eye(head_size, d))
        self.w_key = nn.Parameter(torch.eye(head_size, d))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Block-sparse attention over the routed blocks; same signature as any attention backend."""
        w_query, w_key = self.w_query, self.w_key
        return learned_sparse_attention(
            q, k, v, w_query, w_key, self.block_size, self.top_k, causal, key_valid=key_valid
        )
