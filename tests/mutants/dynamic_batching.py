"""Mutants of the engine (projects 12 and 10): each breaks one thing the checks must notice."""

from __future__ import annotations

import torch

from impl.engine import runs
from impl.engine.continuous import Engine
from impl.engine.speculative import SpeculativeEngine
from impl.gpt.model import GPT
from impl.prompt_caching import prefix


def _run_with(engine_cls, config, state, prompts, max_tokens, stop_ids=(), arrive_at=None, prefix=False, **knobs):
    knobs = runs.engine_knobs(knobs) | ({"prefix_caching": True} if prefix else {})
    engine = engine_cls(GPT.from_state(config, state), **knobs)
    return runs._offline(engine, prompts, max_tokens, stop_ids, arrive_at)


class _LastColumn(Engine):
    @staticmethod
    def _last_logits(logits, n_new):
        return logits[:, -1]  # a right-padded prefill chunk samples from its padding


class _PositionsFromZero(Engine):
    @staticmethod
    def _inputs(group):
        ids, pos = Engine._inputs(group)
        return ids, pos - pos[:, :1]  # every chunk starts at position 0: the cached context's offset is lost


class _LostOnPreemption(Engine):
    def preempt(self, seq):
        super().preempt(seq)
        self.waiting.remove(seq)  # taken off the cache and never queued again


class _OneTokenTooMany(Engine):
    def emit(self, seq, token):
        n = len(seq.generated)
        if n + 1 == seq.params.max_tokens and token not in seq.params.stop_ids:
            seq.tokens.append(token)  # the length check sees one token fewer than there are
            self.counters["generated_tokens"] += 1
            return
        super().emit(seq, token)


def samples_padding_column(**case):
    return _run_with(_LastColumn, **case)


def positions_restart_each_step(**case):
    return _run_with(_PositionsFromZero, **case)


def preempted_request_lost(**case):
    return _run_with(_LostOnPreemption, **case)


def one_token_past_max_tokens(**case):
    return _run_with(_OneTokenTooMany, **case)


def prefix_hash_ignores_parent(config, state, prompts, max_tokens, stop_ids=(), **knobs):
    """The engine with prefix caching whose block hash forgets the blocks before it: the same tokens after a
    different prefix (other keys and values: attention saw another past) are served from the cache."""
    original = prefix.block_hash
    prefix.block_hash = lambda parent, tokens: original(None, tokens)
    try:
        return _run_with(Engine, config, state, prompts, max_tokens, stop_ids, prefix=True, **knobs)
    finally:
        prefix.block_hash = original


@torch.no_grad()
def arrivals_lost_on_preemption(config, state, prompts, max_tokens, arrive_at, stop_ids=(), **knobs):
    return _run_with(_LostOnPreemption, config, state, prompts, max_tokens, stop_ids, arrive_at, **knobs)


def _speculative_with(engine_cls, config, state, prompts, max_tokens, stop_ids=(), **knobs):
    model = GPT.from_state(config, state)
    knobs = runs.engine_knobs(knobs)
    engine = engine_cls(model, runs.shallow_draft(model), num_speculative=3, **knobs)
    return runs._offline(engine, prompts, max_tokens, stop_ids)


class _NoRollback(SpeculativeEngine):
    def _speculate(self, rows):
        original = self.cache.truncate
        self.cache.truncate = lambda seq_id, length: None  # rejected drafts stay in the target's cache
        try:
            return super()._speculate(rows)
        finally:
            self.cache.truncate = original


def engine_keeps_rejected_drafts(**case):
    """The speculative engine without rolling the target's cache back over rejected drafts."""
    return _speculative_with(_NoRollback, **case)
