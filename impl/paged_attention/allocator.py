"""A block allocator: a fixed pool of KV blocks, a free list and a reference count per block.

The paged cache (``fast.PagedKVCache``) asks it for one block at a time as sequences grow and hands
blocks back when sequences shrink or finish. A block may have several owners (a forked sequence, a
shared prompt prefix): ``incref`` adds one, ``free`` drops one, and only the last ``free`` returns the
block, through ``_release``, the hook the prefix-caching allocator (P10) overrides to park a block
instead of forgetting its contents.
"""

from __future__ import annotations


class NoFreeBlocks(RuntimeError):
    """The pool cannot satisfy a request; the caller preempts a sequence or waits."""

    def __init__(self, wanted: int, free: int):
        super().__init__(f"no free KV blocks: wanted {wanted}, {free} free; free a sequence (preempt) and retry")
        self.wanted = wanted
        self.free = free


class BlockAllocator:
    """``num_blocks`` blocks of ``block_size`` token slots each, handed out by id (0 .. num_blocks - 1)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: allocate() pops block 0 first
        self._refs = [0] * num_blocks

    def allocate(self) -> int:
        """A free block with reference count 1; ``NoFreeBlocks`` when none is left."""
        if not self._free:
            raise NoFreeBlocks(1, 0)
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def allocate_many(self, n: int) -> list[int]:
        """``n`` blocks, or none at all: ``NoFreeBlocks`` leaves the pool untouched."""
        if n > self.num_free:
            raise NoFreeBlocks(n, self.num_free)
        return [self.allocate() for _ in range(n)]

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} is not in the pool (0 .. {self.num_blocks - 1})")

    def incref(self, block: int) -> None:
        """One more owner of ``block`` (a fork or a shared prefix); the block must be owned already."""
        self._check(block)
        if self._refs[block] == 0:
            raise ValueError(f"block {block} is free: allocate it before sharing it")
        self._refs[block] += 1

    def free(self, block: int) -> None:
        """One owner fewer; the last one releases the block. Freeing a free block is a double free."""
        self._check(block)
        if self._refs[block] == 0:
            raise ValueError(f"double free of block {block}: its reference count is already 0")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._release(block)

    def _release(self, block: int) -> None:
        """What happens to a block nobody owns any more: back on the free list."""
        self._free.append(block)

    def refcount(self, block: int) -> int:
        """How many owners ``block`` has (0: free)."""
        self._check(block)
        return self._refs[block]

    def writable(self, block: int) -> bool:
        """Whether its one owner may write into ``block`` in place (else copy it first: copy-on-write)."""
        return self.refcount(block) == 1

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can still hand out."""
        return len(self._free)
