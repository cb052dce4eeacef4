"""Mutants of project 20: each is a plausible sparse-attention bug a check must reject."""

from __future__ import annotations

import math

import torch

from impl.sparse_attention import fast, learned
from impl.sparse_attention.patterns import build_layout, expand_layout


# pattern builders (subject of the pattern property check)
def window_off_by_one_block(kind, n_blocks, causal, window, n_global, n_random, seed, stride):
    """The window loop stops one block early (``range(window)`` where ``range(window + 1)`` was meant)."""
    narrow = max(window - 1, 0) if kind in ("window", "bigbird") else window
    return build_layout(kind, n_blocks, causal, narrow, n_global, n_random, seed, stride)


def global_columns_dropped(kind, n_blocks, causal, window, n_global, n_random, seed, stride):
    """Global blocks see everything, but nobody sees them (the column half of Longformer's rule)."""
    layout = build_layout(kind, n_blocks, causal, window, 0, n_random, seed, stride)
    layout[:n_global, :] = True
    if causal:
        layout &= torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    return layout


def random_blocks_unseeded(kind, n_blocks, causal, window, n_global, n_random, seed, stride):
    """BigBird's random blocks drawn from the global RNG: the seed is ignored."""
    unseeded = torch.randint(2**31, ()).item()
    return build_layout(kind, n_blocks, causal, window, n_global, n_random, unseeded, stride)


# attention (subject of the block-sparse == dense-masked check)
def fast_skips_last_kept_block(q, k, v, layout, block_size, causal, block_bias=None):
    """The block-sparse path gathers one key block too few per row (``width - 1``)."""
    original = fast._attend_rows

    def one_block_short(qb, kb, vb, row_layout, rows, width, *rest):
        return original(qb, kb, vb, row_layout, rows, max(width - 1, 1), *rest)

    fast._attend_rows = one_block_short
    try:
        return fast.sparse_attention(q, k, v, layout, block_size, causal, block_bias)
    finally:
        fast._attend_rows = original


def unmasked_dense_softmax(q, k, v, layout, block_size, causal, block_bias=None):
    """Softmax over the whole dense row, then the pattern zeroes the dropped weights: the kept
    weights no longer sum to one."""
    T, hs = q.shape[2], q.shape[3]
    mask = expand_layout(layout, block_size, T, causal)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1) * mask
    return weights @ v


# learned routing: the router itself (subject of the router property check)
def router_picks_lowest_scores(q, k, w_query, w_key, block_size, top_k, causal):
    """The router keeps the worst-scoring blocks (a sign slip, like topk(largest=False))."""
    return learned.route_blocks(q, k, -w_query, w_key, block_size, top_k, causal)


def router_leaky_pooled_query(q, k, w_query, w_key, block_size, top_k, causal):
    """Causal routing with the block's *mean* query: a token's blocks depend on later tokens."""
    routed_q = q.clone()
    routed_q[:, :, ::block_size] = learned._block_means(q, block_size)
    return learned.route_blocks(routed_q, k, w_query, w_key, block_size, top_k, causal)


def router_may_pick_future_block(q, k, w_query, w_key, block_size, top_k, causal):
    """Causal routing that scores like the real router (each block pooled to its first query) but
    forgets the causal candidate mask: any other block, earlier or later, may be kept."""
    T = q.shape[2]
    first = q[:, :, ::block_size].repeat_interleave(block_size, dim=2)[:, :, :T]  # block mean = first query
    return learned.route_blocks(first if causal else q, k, w_query, w_key, block_size, top_k, causal=False)


# learned attention (subject of the learned-pattern check)
def learned_skips_last_kept_block(q, k, v, w_query, w_key, block_size, top_k, causal):
    """The learned pattern run through the block-sparse path that drops one kept block."""
    return learned.learned_sparse_attention(q, k, v, w_query, w_key, block_size, top_k, causal,
                                            fast_skips_last_kept_block)
