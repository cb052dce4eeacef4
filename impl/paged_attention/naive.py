"""Paged attention the way the paper explains it: for each sequence, follow its block table, gather
its blocks into one contiguous K and V, and run ordinary causal attention over them.

Same contract as ``fast.paged_attention`` (see ``impl.paged_attention.fast``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from impl.gpt.attention import naive_attention, sdpa_attention
from impl.gpt.model import GPT
from impl.kv_cache.fast import generate


def gather_row(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` slots of one sequence, contiguous: (nh, length, hs) from a (num_blocks, nh,
    block_size, hs) pool and the sequence's block ids ``table``."""
    bs = pool.shape[2]
    blocks = [pool[int(table[i])] for i in range(-(-length // bs))]  # each (nh, bs, hs)
    return torch.cat(blocks, dim=1)[:, :length]


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Causal attention (B, nh, T, hs), one row at a time over its gathered keys/values."""
    rows = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        k = gather_row(k_pool, block_tables[b], n)[None]  # (1, nh, n, hs)
        v = gather_row(v_pool, block_tables[b], n)[None]
        rows.append(naive_attention(q[b:b + 1], k.to(q.dtype), v.to(q.dtype), True))  # bottom-right causal
    return torch.cat(rows, dim=0)


def contiguous_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
    """The same attention through the model's contiguous ragged-batch path: every row's keys/values
    copied into one left-padded (B, nh, S, hs) batch, padding masked by ``key_valid``, one SDPA call."""
    B, nh, T, hs = q.shape
    S = int(lengths.max())
    k = torch.zeros((B, nh, S, hs), dtype=q.dtype)
    v = torch.zeros((B, nh, S, hs), dtype=q.dtype)
    key_valid = torch.zeros((B, S), dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        k[b, :, S - n:] = gather_row(k_pool, block_tables[b], n)
        v[b, :, S - n:] = gather_row(v_pool, block_tables[b], n)
        key_valid[b, S - n:] = True
    return sdpa_attention(q, k, v, True, key_valid)


@torch.no_grad()
def ragged_greedy_alone(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[torch.Tensor],
                        max_new_tokens: int, block_size: int = 4) -> torch.Tensor:
    """Greedy new tokens (B, max_new_tokens): each prompt decoded alone through P8's contiguous cache.
    (``block_size`` is accepted for the paged version's signature and unused.)"""
    model = GPT.from_state(config, state)
    return torch.cat([generate(model, p.view(1, -1), max_new_tokens)[:, len(p):] for p in prompts], dim=0)
