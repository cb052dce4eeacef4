"""Unit tests of project 13 beyond the spec's checks: the allocator and the paged cache's books under
hypothesis stateful testing, copy-on-write, all-or-none reservation, waste accounting, the Triton
wrapper's device rule, and the claim workload's two servers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from benchmarks.workloads.paged_attention import requests, serve
from impl.gpt.model import GPT, GPTConfig
from impl.paged_attention import fast, triton_kernel
from impl.paged_attention.allocator import BlockAllocator, NoFreeBlocks
from tests.cases.paged_attention import check_invariants

BLOCK = 4


class PagedCacheMachine(RuleBasedStateMachine):
    """Random add / reserve / write / truncate / fork / free of sequences on an 12-block pool."""

    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.cache = fast.PagedKVCache(1, 1, 2, 12, BLOCK)
        self.next_id = 0

    @rule(target=seqs)
    def add(self):
        self.cache.add_sequence(self.next_id)
        self.next_id += 1
        return self.next_id - 1

    def _live(self, s):
        return s in self.cache.sequences()

    @rule(s=seqs, n=st.integers(0, 3 * BLOCK))
    def reserve(self, s, n):
        if not self._live(s):
            return
        before = (self.cache.allocator.num_free, self.cache.block_table(s))
        if self.cache.can_reserve({s: n}):
            self.cache.reserve(s, n)
            assert len(self.cache.block_table(s)) * BLOCK >= self.cache.length(s) + n
        else:
            with pytest.raises(NoFreeBlocks):
                self.cache.reserve(s, n)
            assert (self.cache.allocator.num_free, self.cache.block_table(s)) == before  # all or none

    @rule(s=seqs, n=st.integers(1, BLOCK))
    def write(self, s, n):
        if not self._live(s) or not self.cache.can_reserve({s: n}):
            return
        self.cache.reserve(s, n)
        self.cache.set_batch([s], [n])
        self.cache.advance(n)

    @rule(s=seqs, data=st.data())
    def truncate(self, s, data):
        if not self._live(s):
            return
        length = data.draw(st.integers(0, self.cache.length(s)))
        self.cache.truncate(s, length)
        assert len(self.cache.block_table(s)) == -(-length // BLOCK)  # whole blocks past it are gone

    @rule(target=seqs, s=seqs)
    def fork(self, s):
        if not self._live(s):
            return -1
        self.cache.fork(s, self.next_id)
        self.next_id += 1
        return self.next_id - 1

    @rule(s=seqs)
    def free(self, s):
        if self._live(s):
            self.cache.free_sequence(s)

    @precondition(lambda self: self.next_id > 0)
    @invariant()
    def books_balance(self):
        check_invariants(self.cache)

    def teardown(self):
        for s in self.cache.sequences():
            self.cache.free_sequence(s)
        alloc = self.cache.allocator
        assert alloc.num_free == alloc.num_blocks, "blocks leaked once every sequence finished"
        with pytest.raises(ValueError, match="double free"):
            alloc.free(0)


TestPagedCacheBooks = PagedCacheMachine.TestCase
TestPagedCacheBooks.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, derandomize=True)


def test_allocator_hands_out_every_block_once_then_refuses_with_the_counts():
    alloc = BlockAllocator(3, 8)
    assert sorted(alloc.allocate() for _ in range(3)) == [0, 1, 2]
    with pytest.raises(NoFreeBlocks, match="wanted 2, 0 free"):
        alloc.allocate_many(2)


def test_shared_block_returns_only_when_its_last_owner_frees_it():
    alloc = BlockAllocator(2, 4)
    b = alloc.allocate()
    alloc.incref(b)
    alloc.free(b)
    assert alloc.refcount(b) == 1 and alloc.num_free == 1
    alloc.free(b)
    assert alloc.num_free == 2
    with pytest.raises(ValueError, match="double free"):
        alloc.free(b)
    with pytest.raises(ValueError, match="is free"):
        alloc.incref(b)


def test_forked_sequence_writes_to_its_own_copy_of_the_shared_last_block():
    cache = fast.PagedKVCache(1, 1, 2, 8, 4)
    cache.add_sequence(0)
    cache.reserve(0, 6)
    cache.set_batch([0], [6])
    cache.attend(0, *(torch.arange(12.0).view(1, 1, 6, 2),) * 3, None, None)
    cache.advance(6)
    cache.fork(0, 1)
    parent_tail = cache.block_table(0)[1]
    before = cache.k_pool[0, parent_tail].clone()
    cache.reserve(1, 1)
    assert cache.block_table(1)[0] == cache.block_table(0)[0]  # the full block stays shared
    assert cache.block_table(1)[1] != parent_tail  # the partial one was copied
    cache.set_batch([1], [1])
    cache.attend(0, *(torch.full((1, 1, 1, 2), 99.0),) * 3, None, None)
    assert torch.equal(cache.k_pool[0, parent_tail], before)  # the parent's tokens are untouched
    assert torch.equal(cache.k_pool[0, cache.block_table(1)[1], 0, :2], before[0, :2])


def test_writing_into_a_shared_block_without_reserving_is_refused():
    cache = fast.PagedKVCache(1, 1, 2, 8, 4)
    cache.add_sequence(0)
    cache.reserve(0, 3)
    cache.set_batch([0], [2])
    cache.advance(2)
    cache.fork(0, 1)  # shares the half-filled block; the parent's third slot was reserved before
    cache.set_batch([0], [1])
    with pytest.raises(ValueError, match="shared block"):
        cache.attend(0, *(torch.zeros(1, 1, 1, 2),) * 3, None, None)


def test_waste_counts_each_physical_block_once_and_only_the_unfilled_tail():
    cache = fast.PagedKVCache(1, 1, 2, 8, 4)
    cache.add_sequence(0)
    cache.reserve(0, 5)
    cache.set_batch([0], [5])
    cache.advance(5)
    cache.fork(0, 1)
    assert cache.waste() == {"reserved_slots": 8, "used_slots": 5, "waste": 3 / 8}


def test_triton_wrapper_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernel, "INTERPRET", False)
    q = torch.zeros(1, 1, 1, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_kernel.paged_attention(q, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4),
                                      torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))


def test_paged_cache_decodes_with_the_triton_kernel_like_with_the_torch_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    outs = []
    for attention in (fast.paged_attention, triton_kernel.paged_attention):
        cache = fast.PagedKVCache(1, 2, 8, 8, 3, attention=attention)
        cache.add_sequence(0)
        cache.reserve(0, 7)
        cache.set_batch([0])
        with torch.no_grad():
            outs.append(model(torch.arange(7).view(1, 7), cache=cache, position_ids=torch.arange(7).view(1, 7)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_the_engine_paged_holds_only_filled_blocks_and_preallocating_holds_max_length():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=512, n_layer=1, n_head=1, n_embd=8)).eval()
    # after the first step the 10-token prompt is cached: paged, one block of 16 holds it; pre-allocating,
    # prompt + 448 slots are reserved (29 blocks); the request ends in the second step
    paged = serve([(10, 2)], 16, model)
    contiguous = serve([(10, 2)], 16, model, preallocate=448)
    assert paged["live"] == contiguous["live"] == [1]
    assert paged["waste"] == [1 - 10 / 16]
    assert contiguous["waste"] == [1 - 10 / (29 * 16)]


def test_workload_requests_are_fixed_by_the_seed():
    assert requests() == requests() and len(requests()) == 64
