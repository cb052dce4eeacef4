"""Cases for project 13: paged K/V pools with ragged lengths, ragged prompts for greedy decoding
through the paged cache, and random sequences of cache operations (the bookkeeping property)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.paged_attention.allocator import NoFreeBlocks
from tests.cases.kv_cache import ragged_case


def attention_case(seed: int, lengths: list[int], T: int, n_head: int, head_dim: int, block_size: int,
                   spare_blocks: int = 3, dtype: torch.dtype = torch.float32, id: str | None = None) -> dict[str, Any]:
    """Random queries (B, nh, T, hs) and a pool whose blocks are handed to the rows in a shuffled order,
    with spare random blocks no row owns (a wrong block read changes the output). T is clamped to the
    shortest row (every query sees at least itself); table entries past a row's blocks are random ids."""
    gen = torch.Generator().manual_seed(seed)
    T = min(T, *lengths)
    per_row = [-(-n // block_size) for n in lengths]
    num_blocks = sum(per_row) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(num_blocks, (len(lengths), max(per_row)), generator=gen)
    start = 0
    for b, n in enumerate(per_row):
        tables[b, :n] = order[start:start + n]
        start += n
    pool = (num_blocks, n_head, block_size, head_dim)
    case = {"q": torch.randn(len(lengths), n_head, T, head_dim, generator=gen),
            "k_pool": torch.randn(pool, generator=gen), "v_pool": torch.randn(pool, generator=gen),
            "block_tables": tables, "lengths": torch.tensor(lengths), "dtype": dtype}
    return case | ({"id": id} if id else {})


attention = Cases(
    edge=[
        attention_case(0, [1], 1, 1, 4, 4, id="one-key"),
        attention_case(1, [5, 17, 9], 1, 2, 8, 4, id="decode-ragged-partial-last-blocks"),
        attention_case(2, [12, 8], 8, 2, 8, 4, id="prefill-whole-blocks"),
        attention_case(3, [7, 30, 3], 3, 2, 16, 5, id="three-new-tokens-block-5"),
        attention_case(4, [6, 11], 2, 1, 8, 1, id="block-size-one"),
        attention_case(5, [3, 9], 1, 2, 8, 64, id="block-larger-than-every-row"),
        attention_case(6, [20, 13, 40], 2, 4, 16, 16, dtype=torch.bfloat16, id="bf16"),
    ],
    strategy=st.builds(
        attention_case,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
        T=st.integers(1, 4),
        n_head=st.integers(1, 3),
        head_dim=st.sampled_from([4, 8, 16]),
        block_size=st.integers(1, 17),
        spare_blocks=st.integers(0, 4),
    ),
)


def greedy_case(seed: int, lengths: list[int], max_new_tokens: int, block_size: int, n_layer: int = 2,
                n_head: int = 4, head_dim: int = 8, id: str | None = None) -> dict[str, Any]:
    """P8's ragged prompts and peaked GPT, plus the paged cache's block size."""
    return ragged_case(seed, lengths, max_new_tokens, n_layer, n_head, head_dim, id=id) | {"block_size": block_size}


ragged_prompts = Cases(
    edge=[
        greedy_case(0, [5], 10, 4, id="one-prompt"),
        greedy_case(1, [9, 1, 4, 13], 25, 3, id="four-rows-block-3"),
        greedy_case(2, [16, 3], 30, 1, id="block-size-one"),
        greedy_case(3, [2, 7, 7], 12, 16, id="block-larger-than-prompts"),
        greedy_case(4, [16, 5], 40, 8, n_layer=4, n_head=4, head_dim=32, id="p1-shape"),
    ],
    strategy=st.builds(
        greedy_case,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 16), min_size=1, max_size=4),
        max_new_tokens=st.integers(1, 24),
        block_size=st.integers(1, 9),
        n_layer=st.integers(1, 2),
        n_head=st.sampled_from([1, 2]),
        head_dim=st.sampled_from([4, 8]),
    ),
)


def check_invariants(cache) -> None:
    """The allocator's books match the block tables: each block's reference count is the number of
    tables holding it, no block is both free and owned, free + owned = the pool, every table covers its
    sequence's tokens. (For a plain ``BlockAllocator``: nothing else holds references.)"""
    alloc = cache.allocator
    holders = Counter(block for s in cache.sequences() for block in cache.block_table(s))
    for block in range(alloc.num_blocks):
        assert alloc.refcount(block) == holders.get(block, 0), \
            f"block {block}: refcount {alloc.refcount(block)}, held by {holders.get(block, 0)} tables"
    assert alloc.num_free + len(holders) == alloc.num_blocks, \
        f"{alloc.num_free} free + {len(holders)} owned != {alloc.num_blocks} blocks"
    for s in cache.sequences():
        assert len(cache.block_table(s)) * alloc.block_size >= cache.length(s), f"sequence {s} outgrew its blocks"


def ops_case(seed: int, n_ops: int, block_size: int, num_blocks: int, id: str | None = None) -> dict[str, Any]:
    """A seeded random run of cache operations on a pool of ``num_blocks`` blocks."""
    case = {"seed": seed, "n_ops": n_ops, "block_size": block_size, "num_blocks": num_blocks}
    return case | ({"id": id} if id else {})


def bookkeeping_holds(cache_cls, seed: int, n_ops: int, block_size: int, num_blocks: int) -> None:
    """Random add / reserve / write / truncate / fork / free on ``cache_cls``: the invariants hold after
    every step, a rollback hands back exactly the whole blocks past the new length, a failed reserve
    allocates nothing, nothing leaks once every sequence is freed, and a double free raises."""
    rng = random.Random(seed)
    cache = cache_cls(1, 1, 2, num_blocks, block_size)
    alloc, next_id = cache.allocator, 0
    for _ in range(n_ops):
        live = cache.sequences()
        op = rng.choice(["add", "reserve", "write", "truncate", "fork", "free"] if live else ["add"])
        s = rng.choice(live) if live else None
        if op == "add":
            cache.add_sequence(next_id)
            next_id += 1
        elif op == "reserve":
            before = (alloc.num_free, cache.block_table(s))
            try:
                cache.reserve(s, rng.randint(0, 3 * block_size))
            except NoFreeBlocks:
                assert (alloc.num_free, cache.block_table(s)) == before, "a failed reserve changed the pool"
        elif op == "write":
            room = len(cache.block_table(s)) * block_size - cache.length(s)
            n = rng.randint(0, room)
            if n and not cache.can_reserve({s: n}):
                continue
            cache.reserve(s, n)  # copy-on-write of a shared last block happens here
            cache.set_batch([s], [n])
            cache.advance(max(n, 1))
        elif op == "truncate":
            length = rng.randint(0, cache.length(s))
            free_before, held = alloc.num_free, cache.block_table(s)
            cache.truncate(s, length)
            keep = -(-length // block_size)
            assert cache.block_table(s) == held[:keep], "truncate must keep exactly the blocks covering the tokens"
            released = sum(alloc.refcount(b) == 0 for b in set(held[keep:]))
            assert alloc.num_free == free_before + released, "truncate did not hand its whole blocks back"
        elif op == "fork":
            cache.fork(s, next_id)
            next_id += 1
        else:
            cache.free_sequence(s)
        check_invariants(cache)
    for s in cache.sequences():
        cache.free_sequence(s)
    assert alloc.num_free == num_blocks, f"{num_blocks - alloc.num_free} blocks leaked after every sequence ended"
    try:
        alloc.free(0)
    except ValueError:
        return
    raise AssertionError("freeing a free block did not raise (double free)")


cache_operations = Cases(
    edge=[
        ops_case(0, 60, 4, 16, id="small-pool"),
        ops_case(1, 200, 1, 40, id="block-size-one"),
        ops_case(2, 200, 8, 6, id="pool-runs-out"),
    ],
    strategy=st.builds(ops_case, seed=st.integers(0, 2**16), n_ops=st.integers(1, 120),
                       block_size=st.integers(1, 9), num_blocks=st.integers(1, 30)),
)
