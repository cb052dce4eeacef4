"""Prefix caching on the paged KV cache (P10): full blocks are found again by a chained hash.

A full block of ``block_size`` tokens is registered under ``block_hash(parent_hash, tokens)``, where
``parent_hash`` is the hash of the block before it. The chain makes a block's hash name the whole
prefix up to and including it, so the same tokens after a different prefix (whose keys and values
differ: attention saw a different past) never map to the same block.

A registered block whose last owner lets go is not freed but parked in an LRU of evictable blocks:
its keys and values stay in the pool and ``match`` can revive it. ``allocate`` takes a block that
was never registered first, then evicts the least recently released parked block (dropping its
hash). A block somebody still references is never parked, so never evicted.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

from impl.paged_attention.allocator import BlockAllocator, NoFreeBlocks


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """A stable 64-bit hash of ``tokens`` following the block whose hash is ``parent`` (None: the first
    block). SHA-256 rather than ``hash()``: the same prefix hashes the same in every process."""
    h = hashlib.sha256(b"root" if parent is None else struct.pack("<Q", parent))
    h.update(struct.pack(f"<{len(tokens)}q", *(int(t) for t in tokens)))
    return int.from_bytes(h.digest()[:8], "little")


class PrefixCachingAllocator(BlockAllocator):
    """A ``BlockAllocator`` whose full blocks can be registered by chained hash and shared."""

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__(num_blocks, block_size)
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._parked: OrderedDict[int, None] = OrderedDict()  # least recently released first
        self.queried_blocks = self.hit_blocks = 0

    def allocate(self) -> int:
        """A never-registered free block, else the least recently used parked one (its hash dropped)."""
        if self._free:
            return super().allocate()
        if not self._parked:
            raise NoFreeBlocks(1, 0)
        block, _ = self._parked.popitem(last=False)  # evict: the least recently used
        del self._by_hash[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        if block in self._hash_of:
            self._parked[block] = None  # kept findable; most recently used goes last
        else:
            super()._release(block)

    def _acquire(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._parked[block]  # revived: no longer evictable
        self._refs[block] += 1

    def match(self, tokens: Sequence[int]) -> list[int]:
        """The blocks already holding the longest cached run of full blocks of ``tokens`` (from the
        first block on); each returned block gets one more reference, the caller owns it."""
        bs = self.block_size
        n_full = len(tokens) // bs
        found: list[int] = []
        parent = None
        for i in range(n_full):
            parent = block_hash(parent, tokens[i * bs:(i + 1) * bs])
            block = self._by_hash.get(parent)
            if block is None:
                break
            self._acquire(block)
            found.append(block)
        self.queried_blocks += n_full
        self.hit_blocks += len(found)
        return found

    def register(self, block: int, parent: int | None, tokens: Sequence[int]) -> int:
        """Make ``block``, now filled with ``tokens`` (a full block) after the block hashed ``parent``,
        findable; returns its hash. A hash already cached keeps its existing block."""
        if len(tokens) != self.block_size:
            raise ValueError(f"only full blocks are cached: got {len(tokens)} tokens, block_size {self.block_size}")
        if self.refcount(block) == 0:
            raise ValueError(f"block {block} is free: only an owned, filled block can be registered")
        h = block_hash(parent, tokens)
        known = self._hash_of.get(block)
        if known is not None and known != h:
            raise ValueError(f"block {block} is already cached under another prefix")
        if h not in self._by_hash:
            self._by_hash[h] = block
            self._hash_of[block] = h
        return h

    def is_cached(self, block: int) -> bool:
        """Whether ``block`` is registered (findable by ``match``)."""
        return block in self._hash_of

    def writable(self, block: int) -> bool:
        """A registered block is read-only: other requests may match it, so writes go to a copy."""
        return super().writable(block) and block not in self._hash_of

    @property
    def num_parked(self) -> int:
        """Registered blocks nobody owns: evictable, still findable."""
        return len(self._parked)

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out: free ones plus parked (evictable) ones."""
        return len(self._free) + len(self._parked)

    def stats(self) -> dict:
        """Hit-rate counters over every ``match``: full blocks asked for, found, and the rate."""
        rate = self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0
        return {"queried_blocks": self.queried_blocks, "hit_blocks": self.hit_blocks,
                "queried_tokens": self.queried_blocks * self.block_size,
                "hit_tokens": self.hit_blocks * self.block_size, "hit_rate": rate}
