"""Project 10's prefix-caching allocator: chained block hashes, reference-counted sharing and LRU
eviction, under hypothesis stateful testing against a simple model; the two mutants (a hash that
forgets its parent, eviction of a block still referenced) must break the properties."""

from __future__ import annotations

from collections import Counter, OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from impl.paged_attention.allocator import NoFreeBlocks
from impl.prompt_caching.prefix import PrefixCachingAllocator, block_hash
from tests.mutants.paged_attention import EvictsReferencedBlocks, HashWithoutParent

BLOCK, POOL = 2, 6


def machine_for(alloc_cls):
    """A state machine serving requests (token streams over a 2-letter alphabet) through ``alloc_cls``:
    match the cached prefix, allocate and register the rest, finish requests in any order."""

    class PrefixMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.alloc = alloc_cls(POOL, BLOCK)
            self.requests: dict[int, tuple[list[int], list[int]]] = {}  # id -> (tokens, blocks)
            self.parked: OrderedDict[int, None] = OrderedDict()  # the model of the LRU
            self.cached: set[int] = set()
            self.next_id = 0

        def _refs(self) -> Counter:
            return Counter(b for _, blocks in self.requests.values() for b in blocks)

        @rule(tokens=st.lists(st.integers(0, 1), min_size=BLOCK, max_size=4 * BLOCK))
        def serve(self, tokens):
            n_full = len(tokens) // BLOCK
            blocks = self.alloc.match(tokens)
            for b in blocks:
                self.parked.pop(b, None)  # revived
            parent = None
            for i in range(len(blocks)):
                parent = block_hash(parent, tokens[i * BLOCK:(i + 1) * BLOCK])
            held = self._refs()
            for i in range(len(blocks), n_full):
                evicting = self.parked and self.alloc.num_free == len(self.parked)  # no never-cached block left
                expected_victim = next(iter(self.parked)) if evicting else None
                try:
                    b = self.alloc.allocate()
                except NoFreeBlocks:
                    assert self.alloc.num_free == 0
                    break
                assert b not in held and b not in blocks, f"block {b} handed out while still referenced"
                if expected_victim is not None:
                    assert b == expected_victim, f"evicted {b}, the least recently used parked is {expected_victim}"
                    del self.parked[b]
                    self.cached.discard(b)
                parent = self.alloc.register(b, parent, tokens[i * BLOCK:(i + 1) * BLOCK])
                self.cached.add(b)
                blocks.append(b)
            self.requests[self.next_id] = (tokens, blocks)
            self.next_id += 1

        @rule(data=st.data())
        def finish(self, data):
            if not self.requests:
                return
            rid = data.draw(st.sampled_from(sorted(self.requests)))
            _, blocks = self.requests.pop(rid)
            for b in reversed(blocks):  # the tail first: it is the least useful to keep
                self.alloc.free(b)
                if self.alloc.refcount(b) == 0 and b in self.cached:
                    self.parked[b] = None

        @invariant()
        def refcounts_are_exact(self):
            refs = self._refs()
            for b in range(POOL):
                assert self.alloc.refcount(b) == refs.get(b, 0)
            assert self.alloc.num_free == POOL - len(refs)

        @invariant()
        def different_prefixes_never_share_blocks(self):
            seen: dict[int, list[int]] = {}
            for tokens, blocks in self.requests.values():
                for i, b in enumerate(blocks):
                    prefix = tokens[:(i + 1) * BLOCK]
                    assert seen.setdefault(b, prefix) == prefix, f"block {b} holds two different prefixes"

        def teardown(self):
            for rid in list(self.requests):
                for b in self.requests.pop(rid)[1]:
                    self.alloc.free(b)
            assert self.alloc.num_free == POOL, "blocks leaked once every request finished"

    return PrefixMachine


SETTINGS = settings(max_examples=80, stateful_step_count=25, deadline=None, derandomize=True,
                    report_multiple_bugs=False)


def test_prefix_allocator_keeps_exact_refcounts_lru_order_and_never_shares_different_prefixes():
    run_state_machine_as_test(machine_for(PrefixCachingAllocator), settings=SETTINGS)


@pytest.mark.parametrize("mutant", [HashWithoutParent, EvictsReferencedBlocks], ids=lambda c: c.__name__)
def test_the_stateful_properties_reject_the_mutant(mutant):
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine_for(mutant), settings=SETTINGS)


def test_block_hash_is_chained_and_stable():
    a = block_hash(None, [1, 2])
    assert a == block_hash(None, [1, 2])
    assert block_hash(a, [3, 4]) != block_hash(block_hash(None, [9, 9]), [3, 4])
    assert block_hash(None, [3, 4]) != block_hash(a, [3, 4])


def test_the_same_block_after_a_different_prefix_is_not_matched():
    alloc = PrefixCachingAllocator(4, 2)
    first, second = alloc.allocate(), alloc.allocate()
    alloc.register(second, alloc.register(first, None, [1, 1]), [5, 5])
    assert alloc.match([5, 5, 1, 1]) == []  # [5, 5] was cached after [1, 1], not at the start


def test_a_hash_without_its_parent_matches_the_wrong_prefix():
    alloc = HashWithoutParent(4, 2)
    first, second = alloc.allocate(), alloc.allocate()
    alloc.register(second, alloc.register(first, None, [1, 1]), [5, 5])
    assert alloc.match([5, 5, 1, 1])[0] == second  # what the chained hash prevents


def test_parked_block_is_revived_by_match_and_evicted_least_recently_used_first():
    alloc = PrefixCachingAllocator(2, 2)
    a, b = alloc.allocate(), alloc.allocate()
    ha = alloc.register(a, None, [1, 2])
    alloc.register(b, ha, [3, 4])
    alloc.free(b)
    alloc.free(a)  # parked: b, then a
    assert alloc.num_free == 2 and alloc.num_parked == 2
    assert alloc.match([1, 2]) == [a] and alloc.refcount(a) == 1  # revived, no longer evictable
    assert alloc.allocate() == b  # the only parked block left is evicted, its hash dropped
    assert alloc.match([1, 2, 3, 4]) == [a] and alloc.stats()["hit_blocks"] == 2
    with pytest.raises(NoFreeBlocks):
        alloc.allocate()


def test_a_hash_already_cached_keeps_its_block():
    alloc = PrefixCachingAllocator(3, 2)
    a, b = alloc.allocate(), alloc.allocate()
    assert alloc.register(a, None, [7, 7]) == alloc.register(b, None, [7, 7])
    assert alloc.match([7, 7]) == [a] and not alloc.is_cached(b)
