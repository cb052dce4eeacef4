"""Mutants of project 13 (paged attention) and of P10's prefix-caching allocator."""

from __future__ import annotations

import torch

from impl.paged_attention import fast, triton_kernel
from impl.prompt_caching import prefix


def last_partial_block_misread(q, k_pool, v_pool, block_tables, lengths):
    """The last block of a row whose length is not a multiple of the block size is read from the
    block before it (an off-by-one in the table index of the partial block)."""
    bs = k_pool.shape[2]
    tables = block_tables.clone()
    for b, n in enumerate(lengths.tolist()):
        last = (n - 1) // bs
        if n % bs and last > 0:
            tables[b, last] = tables[b, last - 1]
    return fast.paged_attention(q, k_pool, v_pool, tables, lengths)


def _visible_keys_off_by_one(lengths, T, S):
    query_pos = lengths[:, None] - T + torch.arange(T, device=lengths.device)
    return (torch.arange(S, device=lengths.device) < query_pos[:, :, None])[:, None]  # bug: misses its own key


def lengths_off_by_one(q, k_pool, v_pool, block_tables, lengths):
    """Each query sees the keys before its own position but not its own (length counted one short)."""
    original = fast.visible_keys
    fast.visible_keys = _visible_keys_off_by_one
    try:
        return fast.paged_attention(q, k_pool, v_pool, block_tables, lengths)
    finally:
        fast.visible_keys = original


def triton_first_row_table_for_all(q, k_pool, v_pool, block_tables, lengths):
    """The kernel is handed row 0's block table for every row (a table stride of 0)."""
    tables = block_tables[:1].expand_as(block_tables)
    return triton_kernel.paged_attention(q, k_pool, v_pool, tables, lengths)


class _LateWriteCache(fast.PagedKVCache):
    def _slot(self, seq_id, position):
        # bug: each new key/value lands one slot early (over the previous token), its own slot stays stale
        return super()._slot(seq_id, max(position - 1, 0))


def writes_at_wrong_slot(config, state, prompts, max_new_tokens, block_size):
    """Greedy decoding through a cache that writes new keys/values one slot before where they belong."""
    original = fast.PagedKVCache
    fast.PagedKVCache = _LateWriteCache
    try:
        return fast.ragged_greedy(config, state, prompts, max_new_tokens, block_size)
    finally:
        fast.PagedKVCache = original


class TruncateKeepsBlocks(fast.PagedKVCache):
    """A rollback that moves the length back but keeps (and never frees) the blocks past it."""

    def truncate(self, seq_id, length):
        if not 0 <= length <= self._lengths[seq_id]:
            raise ValueError("bad length")
        self._lengths[seq_id] = length


# --- P10: the prefix-caching allocator ---

_chained_hash = prefix.block_hash


def _hash_without_parent(parent, tokens):
    return _chained_hash(None, tokens)  # bug: a block's hash forgets what came before it


class HashWithoutParent(prefix.PrefixCachingAllocator):
    """Registers and matches blocks by their own tokens only: equal blocks after different prefixes
    collide, so one request gets another's keys/values."""

    def match(self, tokens):
        original = prefix.block_hash
        prefix.block_hash = _hash_without_parent
        try:
            return super().match(tokens)
        finally:
            prefix.block_hash = original

    def register(self, block, parent, tokens):
        original = prefix.block_hash
        prefix.block_hash = _hash_without_parent
        try:
            return super().register(block, parent, tokens)
        finally:
            prefix.block_hash = original


class EvictsReferencedBlocks(prefix.PrefixCachingAllocator):
    """Parks a cached block as soon as one owner lets go, even while others still hold it: allocate()
    may then evict and hand out a block somebody is reading."""

    def free(self, block):
        super().free(block)
        if self.refcount(block) > 0 and self.is_cached(block) and block not in self._parked:
            self._parked[block] = None
