"""Speculative decoding inside the batched engine: every decoding request drafts k tokens with a small model,
and the target verifies all of them, for every request at once, in ONE forward (Leviathan et al. 2023, Chen et
al. 2023; P11's ``impl.speculative_decoding`` is the one-request version and owns the accept rules).

Per step, the decoding rows:

1. catch up the draft's own paged cache with every token it has not seen (after a prefill: the whole prompt),
   then draft ``k`` tokens per row (one draft forward per drafted token, all rows together), drawing with
   each request's settings (greedy: argmax);
2. run the target on ``[last token, d1 .. dk]`` for every row (T = k + 1, each row at its own position);
3. keep what ``greedy_accept`` / ``sampled_accept`` accept, plus the target's next token, and roll both
   caches back to the kept length (``truncate``: rejected drafts' slots are overwritten later, never read).

A row without room for drafts (its ``max_tokens`` or the context nearly reached, or no free block) runs with
k = 0 in the same forward: a plain decode. Greedy output is exactly the target's greedy output.
"""

from __future__ import annotations

import torch

from impl.engine.continuous import Engine, padded_rows
from impl.engine.request import SeqState, choose_tokens
from impl.gpt.model import GPT
from impl.gpt.sampling import next_token_probs
from impl.paged_attention.allocator import NoFreeBlocks
from impl.paged_attention.fast import PagedKVCache
from impl.speculative_decoding.verify import greedy_accept, sampled_accept


class SpeculativeEngine(Engine):
    """``Engine`` whose decoding requests advance by up to ``num_speculative + 1`` tokens a step."""

    def __init__(self, model: GPT, draft: GPT, *, num_speculative: int = 4, **kwargs):
        super().__init__(model, **kwargs)
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft has {draft.config.vocab_size} ids and the target "
                             f"{model.config.vocab_size}: they must share one tokenizer")
        if num_speculative < 1:
            raise ValueError(f"num_speculative must be at least 1, got {num_speculative}")
        self.draft = draft.eval()
        self.context = min(self.context, draft.config.block_size)
        self.draft_cache = PagedKVCache.for_model(draft, self.cache.allocator.num_blocks, self.block_size)
        self.k = num_speculative
        self.counters |= {"draft_forwards": 0, "drafted": 0, "accepted": 0}

    def release(self, seq: SeqState) -> None:
        if seq.slot in self.draft_cache.sequences():
            self.draft_cache.free_sequence(seq.slot)
        super().release(seq)

    @torch.no_grad()
    def _step(self) -> list[SeqState]:
        plan = self._schedule()
        decoding = [seq for seq, n in plan if n == 1 and seq.num_computed == len(seq.tokens) - 1]
        chunks = [(seq, n) for seq, n in plan if seq not in decoding]
        touched = self._forward(chunks) if chunks else []
        return touched + (self._speculate(decoding) if decoding else [])

    def _room(self, seq: SeqState) -> int:
        """Drafts ``seq`` can take this step: within its max_tokens and the context, with blocks reserved."""
        k = min(self.k, seq.params.max_tokens - len(seq.generated) - 1, self.context - len(seq.tokens) - 1)
        if k <= 0:
            return 0
        if seq.slot not in self.draft_cache.sequences():
            self.draft_cache.add_sequence(seq.slot)
        unseen = len(seq.tokens) - self.draft_cache.length(seq.slot)
        try:
            self.cache.reserve(seq.slot, 1 + k)  # the last token (already reserved) and k drafts
            self.draft_cache.reserve(seq.slot, unseen + k - 1)  # the draft never runs on its last draft
        except NoFreeBlocks:
            return 0  # a plain decode this step: blocks reserved beyond it are used by later steps
        return k

    def _speculate(self, rows: list[SeqState]) -> list[SeqState]:
        ks = [self._room(seq) for seq in rows]
        drafts, draft_probs = self._draft([s for s, k in zip(rows, ks, strict=True) if k], [k for k in ks if k])
        # (B, T): each row's last token, then its drafts, from the position of that last token
        ids, pos = padded_rows([(seq.tokens[-1:] + drafts.get(seq.slot, []), seq.num_computed) for seq in rows])
        self.cache.set_batch([seq.slot for seq in rows], [1 + k for k in ks])
        logits = self.model(ids.to(self.device), cache=self.cache, position_ids=pos.to(self.device))  # (B, T, V)
        self.counters["forwards"] += 1
        for b, (seq, k) in enumerate(zip(rows, ks, strict=True)):
            row_logits = logits[b, : 1 + k]
            proposed = torch.tensor(drafts.get(seq.slot, []), dtype=torch.long)
            p = seq.params
            if p.temperature == 0:
                kept = greedy_accept(row_logits, proposed)
            else:
                target_probs = next_token_probs(row_logits, p.temperature, p.top_k, p.top_p)
                kept = sampled_accept(target_probs, draft_probs.get(seq.slot, target_probs[:0]), proposed,
                                      seq.generator)
            self.counters["drafted"] += k
            self.counters["accepted"] += len(kept) - 1
            seq.num_computed += len(kept)  # the last token and the accepted drafts are cached
            self.cache.truncate(seq.slot, seq.num_computed)
            if seq.slot in self.draft_cache.sequences():
                self.draft_cache.truncate(seq.slot, min(self.draft_cache.length(seq.slot), seq.num_computed))
            if self.prefix_caching:
                self._register_full_blocks(seq)
            for token in kept:
                self.emit(seq, token)
                if seq.finished:
                    break
        return rows

    def _draft(self, rows: list[SeqState], ks: list[int]) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Up to ``ks[b]`` draft tokens per row (and, for sampled rows, the draft's distributions (k, V))."""
        drafts: dict[int, list[int]] = {seq.slot: [] for seq in rows}
        probs: dict[int, list[torch.Tensor]] = {seq.slot: [] for seq in rows}
        live = list(range(len(rows)))
        for step in range(max(ks, default=0)):
            live = [b for b in live if ks[b] > step]
            group = []
            for b in live:
                seq = rows[b]
                seen = self.draft_cache.length(seq.slot)
                group.append((seq, (seq.tokens + drafts[seq.slot])[seen:], seen))  # first step: all it missed
            ids, pos = padded_rows([(pending, seen) for _, pending, seen in group])
            self.draft_cache.set_batch([seq.slot for seq, _, _ in group], [len(p) for _, p, _ in group])
            logits = self.draft(ids.to(self.device), cache=self.draft_cache, position_ids=pos.to(self.device))
            self.counters["draft_forwards"] += 1
            last = self._last_logits(logits, [len(p) for _, p, _ in group])  # (B, vocab)
            picks = choose_tokens(last, [seq for seq, _, _ in group])
            for i, (seq, _, _) in enumerate(group):
                drafts[seq.slot].append(picks[i])
                if seq.params.temperature > 0:
                    p = seq.params
                    probs[seq.slot].append(next_token_probs(last[i : i + 1], p.temperature, p.top_k, p.top_p)[0])
        return drafts, {s: torch.stack(q) for s, q in probs.items() if q}
