"""Static batching, the baseline continuous batching is measured against (and request-level dynamic batching).

When no batch is running, the engine takes up to ``max_batch`` waiting requests (in arrival order: whatever has
arrived, so this is request-level dynamic batching; with every request queued up front it is plain static
batching), left-pads their prompts to the longest one, prefills them in one forward and decodes the whole batch
one token per step until its longest request ends. A row whose request finished keeps its place: it is fed
padding (masked out) until the batch ends, and a request that arrives meanwhile waits for the next batch. That
idle row is the waste continuous batching removes.

The cache is P8's pre-allocated contiguous ``KVCache`` sized for the batch's longest possible sequence.
"""

from __future__ import annotations

import torch

from impl.engine.base import EngineBase
from impl.engine.request import SeqState, choose_tokens
from impl.gpt.model import GPT
from impl.kv_cache.fast import KVCache, pad_prompts


class StaticEngine(EngineBase):
    """Batches formed when the previous one is done, each run until its longest request ends."""

    def __init__(self, model: GPT, *, max_batch: int = 8, pad_id: int = 0, **kwargs):
        super().__init__(model, **kwargs)
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.pad_id = pad_id
        self.batch: list[SeqState] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, cached): 1 for real tokens

    def release(self, seq: SeqState) -> None:
        pass  # the batch's cache is freed when the whole batch ends: the point of the baseline

    @torch.no_grad()
    def _step(self) -> list[SeqState]:
        if not any(not s.finished for s in self.batch):
            return self._start_batch()
        rows = self.batch
        if self.cache.position >= self.cache.max_tokens:  # the padded batch reached the context: all end
            ended = [s for s in rows if not s.finished]
            for s in ended:
                s.finish_reason, s.metrics.finish_s = "length", self.clock()
            return ended
        live = torch.tensor([[0 if s.finished else 1] for s in rows], device=self.device)  # (B, 1)
        last = torch.tensor([[s.tokens[-1] if not s.finished else self.pad_id] for s in rows], device=self.device)
        self.mask = torch.cat([self.mask, live], dim=1)
        logits = self.model(last, cache=self.cache, attention_mask=self.mask)  # (B, 1, vocab): every row
        self.counters["forwards"] += 1
        return self._sample(logits[:, -1])

    def _start_batch(self) -> list[SeqState]:
        """Take the next batch from the queue and prefill it."""
        self.batch = [self.waiting.popleft() for _ in range(min(self.max_batch, len(self.waiting)))]
        if not self.batch:
            return []
        idx, mask = pad_prompts([s.tokens for s in self.batch], self.pad_id, self.device)  # (B, T)
        most = max(s.params.max_tokens for s in self.batch)
        # slots: the padded prompt, then one per decode step; left padding counts against the context, as in
        # HF's padded generate, so a batch never runs past the model's position table
        self.cache = KVCache.for_model(self.model, len(self.batch), min(self.context, idx.shape[1] + most))
        self.mask = mask
        logits = self.model(idx, cache=self.cache, attention_mask=mask)
        self.counters["forwards"] += 1
        return self._sample(logits[:, -1])

    def _sample(self, last_logits: torch.Tensor) -> list[SeqState]:
        """Append a token to every unfinished row (finished rows only ride along)."""
        live = [b for b, s in enumerate(self.batch) if not s.finished]
        picks = choose_tokens(last_logits[live], [self.batch[b] for b in live])
        for b, token in zip(live, picks, strict=True):
            self.emit(self.batch[b], token)
        return [self.batch[b] for b in live]
