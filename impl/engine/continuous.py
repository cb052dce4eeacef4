"""Continuous batching on a paged KV cache: iteration-level scheduling (Orca, Yu et al. 2022) over vLLM's
block-table cache (Kwon et al. 2023), with optional prefix caching.

Every ``step()`` is one scheduling iteration:

1. Running requests, oldest first, get their next tokens into the step: one for a request that is decoding,
   a chunk of its prompt for one still prefilling (chunked prefill), all within ``max_batched_tokens``. Each
   reserves cache blocks for them; when the pool is out of blocks the newest running request is *preempted*:
   its blocks are freed and it goes back to the front of the queue, to be recomputed (prompt and the tokens it
   already generated) when it is admitted again.
2. Waiting requests are admitted in arrival order (no overtaking, so none starves) while there is a free
   batch row (``max_num_seqs``), token budget, and blocks for their first chunk above a small watermark.
   With prefix caching, an admitted request first takes every full block of its prompt already cached.
3. Decodes run as one forward (T = 1 per row), prefill chunks as another (right-padded to the longest chunk);
   every row sits at its own position (``position_ids``) over its own block table.
4. A request whose tokens are all in the cache gets its next token, drawn with its own settings; stop ids,
   ``max_tokens`` and the model's context end it, and its blocks go back to the pool at once, so the next
   step can admit someone else. That is the difference from static batching.

``kv_bits=8`` (or 4) stores the blocks as KIVI-quantized keys and values (project 15,
``impl/kv_quantization/paged.py``): the same scheduling, 3.3x (int8) / 5.8x (int4) fewer bytes per token
than the fp32 blocks at block size 16 (bpe-base), plus each running sequence's fp32 keys of its last block.
"""

from __future__ import annotations

import math

import torch

from impl.engine.base import EngineBase
from impl.engine.request import SamplingParams, SeqState, choose_tokens
from impl.gpt.model import GPT
from impl.paged_attention.allocator import BlockAllocator, NoFreeBlocks
from impl.paged_attention.fast import PagedKVCache
from impl.prompt_caching.prefix import PrefixCachingAllocator


def padded_rows(rows: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and position ids (B, T) for rows of (tokens to feed, position of the first), right-padded to
    the longest row: every row at its own position over its own block table."""
    B, T = len(rows), max(len(tokens) for tokens, _ in rows)
    ids = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for b, (tokens, start) in enumerate(rows):
        n = len(tokens)
        ids[b, :n] = torch.tensor(tokens)
        pos[b, :n] = torch.arange(start, start + n)
        pos[b, n:] = start + n - 1  # padding queries: any valid position, their outputs are never read
    return ids, pos


class Engine(EngineBase):
    """The engine: continuous batching, paged KV cache, optional prefix caching and response cache."""

    def __init__(self, model: GPT, *, max_num_seqs: int = 16, max_batched_tokens: int = 512, block_size: int = 16,
                 num_blocks: int | None = None, prefix_caching: bool = False, watermark: float = 0.01,
                 preallocate: int | None = None, kv_bits: int | None = None, **kwargs):
        super().__init__(model, **kwargs)
        if max_num_seqs < 1 or max_batched_tokens < 1:
            raise ValueError(f"max_num_seqs ({max_num_seqs}) and max_batched_tokens ({max_batched_tokens}) "
                             "must be at least 1")
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.block_size = block_size
        if num_blocks is None:  # room for every row at the model's full context
            num_blocks = max_num_seqs * math.ceil(self.context / block_size)
        allocator = (PrefixCachingAllocator if prefix_caching else BlockAllocator)(num_blocks, block_size)
        if kv_bits is None:
            self.cache = PagedKVCache.for_model(model, num_blocks, block_size, allocator=allocator)
        else:  # P15: KIVI int8 / int4 keys and values in the same blocks
            from impl.kv_quantization.paged import QuantizedPagedKVCache

            self.cache = QuantizedPagedKVCache.for_model(model, num_blocks, block_size, allocator=allocator,
                                                         bits=kv_bits)
        self.prefix_caching = prefix_caching
        self.watermark_blocks = max(1, int(watermark * num_blocks))
        # None: blocks as tokens arrive (paged). N: on admission, reserve the prompt plus N new tokens at once, as a
        # server that pre-allocates each request's longest possible sequence contiguously does (P13's baseline)
        self.preallocate = preallocate
        self.running: list[SeqState] = []  # in admission order: the last one is preempted first
        self.hashes: dict[int, list[int]] = {}  # cache slot -> hashes of its registered full blocks

    # --- capacity -----------------------------------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        longest = min(len(prompt) + max(params.max_tokens, self.preallocate or 0), self.context)
        blocks = math.ceil(longest / self.block_size)
        if blocks > self.cache.allocator.num_blocks:
            raise ValueError(f"a request of up to {longest} tokens needs {blocks} cache blocks, more than the "
                             f"whole pool ({self.cache.allocator.num_blocks} blocks of {self.block_size}): "
                             "lower max_tokens or give the engine more blocks")

    def release(self, seq: SeqState) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.free_sequence(seq.slot)
            self.hashes.pop(seq.slot, None)

    def preempt(self, seq: SeqState) -> None:
        """Take ``seq``'s blocks back; it waits at the front of the queue and is recomputed when readmitted."""
        self.release(seq)
        seq.num_computed = 0
        seq.metrics.preemptions += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: SeqState, budget: int) -> int:
        """Start ``seq`` in the cache (reusing cached prefix blocks) and reserve its first chunk; the chunk's
        length, or 0 (nothing held) when the pool cannot take it."""
        blocks: list[int] = []
        if self.prefix_caching:  # the last prompt token is always recomputed: its logits give the next token
            usable = (len(seq.tokens) - 1) // self.block_size * self.block_size
            blocks = self.cache.allocator.match(seq.tokens[:usable])
        self.cache.add_sequence(seq.slot, blocks, len(blocks) * self.block_size)
        seq.num_computed = len(blocks) * self.block_size
        n = min(len(seq.tokens) - seq.num_computed, budget)
        reserve = n
        if self.preallocate is not None:
            longest = min(len(seq.prompt) + self.preallocate, self.context)
            reserve = max(n, longest - seq.num_computed)
        try:
            wanted = self.cache.blocks_needed(seq.slot, reserve)
            # keep room for running decodes to grow; a request alone in the engine may take the whole pool
            if self.running and self.cache.allocator.num_free - wanted < self.watermark_blocks:
                raise NoFreeBlocks(wanted + self.watermark_blocks, self.cache.allocator.num_free)
            self.cache.reserve(seq.slot, reserve)
        except NoFreeBlocks:
            self.cache.free_sequence(seq.slot)
            seq.num_computed = 0
            return 0
        seq.metrics.cached_prompt_tokens = max(seq.metrics.cached_prompt_tokens, len(blocks) * self.block_size)
        return n

    # --- one iteration -------------------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[SeqState, int]]:
        """Which requests run this step and how many of their tokens."""
        budget, plan = self.max_batched_tokens, []
        for seq in list(self.running):
            if seq not in self.running:  # preempted while an older request made room
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if n == 0:
                break
            while True:
                try:
                    self.cache.reserve(seq.slot, n)
                    break
                except NoFreeBlocks:
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
            if seq in self.running:
                plan.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan

    @torch.no_grad()
    def _step(self) -> list[SeqState]:
        plan = self._schedule()
        touched = []
        for group in ([p for p in plan if p[1] == 1], [p for p in plan if p[1] > 1]):  # decodes, prefill chunks
            if group:
                touched += self._forward(group)
        return touched

    def _forward(self, group: list[tuple[SeqState, int]]) -> list[SeqState]:
        """One model forward over ``group``'s rows; samples for the rows whose tokens are now all cached."""
        ids, pos = self._inputs(group)  # (B, T) each
        self.cache.set_batch([seq.slot for seq, _ in group], [n for _, n in group])
        logits = self.model(ids.to(self.device), cache=self.cache, position_ids=pos.to(self.device))  # (B, T, V)
        self.counters["forwards"] += 1
        last = self._last_logits(logits, [n for _, n in group])  # (B, vocab)
        ready = []
        for b, (seq, n) in enumerate(group):
            seq.num_computed += n
            if self.prefix_caching:
                self._register_full_blocks(seq)
            if seq.num_computed == len(seq.tokens):
                ready.append(b)
        picks = choose_tokens(last[ready], [group[b][0] for b in ready])
        for b, token in zip(ready, picks, strict=True):
            self.emit(group[b][0], token)
        return [seq for seq, _ in group]

    @staticmethod
    def _inputs(group: list[tuple[SeqState, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and position ids (B, T) of the group's next tokens, right-padded to the longest chunk."""
        return padded_rows([(seq.tokens[seq.num_computed : seq.num_computed + n], seq.num_computed)
                            for seq, n in group])

    @staticmethod
    def _last_logits(logits: torch.Tensor, n_new: list[int]) -> torch.Tensor:
        """Each row's logits (B, vocab) at its last real token (right padding follows it)."""
        return logits[torch.arange(logits.shape[0]), torch.tensor(n_new) - 1]

    def _register_full_blocks(self, seq: SeqState) -> None:
        """Publish every block of ``seq`` that is now full under its chained hash (prefix caching)."""
        hashes = self.hashes.setdefault(seq.slot, [])
        table = self.cache.block_table(seq.slot)
        for i in range(len(hashes), seq.num_computed // self.block_size):
            parent = hashes[-1] if hashes else None
            chunk = seq.tokens[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(self.cache.allocator.register(table[i], parent, chunk))

    def prefix_stats(self) -> dict:
        """Hit-rate counters of the prefix cache (empty without prefix caching)."""
        return self.cache.allocator.stats() if self.prefix_caching else {}
