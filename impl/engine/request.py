"""What an engine is asked and what it answers: sampling settings, a request's running state, its output.

Shared by every engine (static, continuous) so the benchmarks, the tests and the server drive them the same way.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from impl.gpt.sampling import next_token_probs


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy; ``seed`` makes sampling reproducible
    (each request draws from its own generator, so its tokens do not depend on what it is batched with)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def deterministic(self) -> bool:
        """Whether the output is a function of the prompt and these settings alone (greedy, or seeded)."""
        return self.temperature == 0 or self.seed is not None


@dataclass
class RequestMetrics:
    """Clock readings (the engine's clock, seconds) and counters of one request."""

    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (not recomputed)
    preemptions: int = 0  # times its cache blocks were taken back and its tokens recomputed later
    response_cache_hit: bool = False

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival to the first generated token."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def latency_s(self) -> float | None:
        """Arrival to the last token."""
        return None if self.finish_s is None else self.finish_s - self.arrival_s


@dataclass
class RequestOutput:
    """A request's state after a step: every token generated so far, those new in this step (streaming),
    and, once finished, why (``"stop"``: a stop id, kept as the last token; ``"length"``: max_tokens or the
    model's context; ``"abort"``)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics


_ids = itertools.count()


@dataclass(eq=False)  # identity: the scheduler's `seq in queue` must not compare every field
class SeqState:
    """One request inside an engine: its tokens (prompt, then generated) and how many sit in the cache."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    finish_reason: str | None = None
    emitted: int = 0  # generated tokens already reported by a step
    slot: int = field(default_factory=lambda: next(_ids))  # the cache's sequence id

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> RequestOutput:
        """The output as of now; marks the new tokens as reported."""
        generated = self.generated
        new, self.emitted = generated[self.emitted:], len(generated)
        return RequestOutput(self.request_id, list(self.prompt), list(generated), new, self.finished,
                             self.finish_reason, self.metrics)


def check_prompt(prompt_ids: Sequence[int] | torch.Tensor, vocab_size: int, context: int) -> list[int]:
    """The prompt as a list of ids; a clear error for an empty prompt, an id outside the vocabulary, or a
    prompt that leaves no room in the model's context."""
    ids = [int(i) for i in torch.as_tensor(prompt_ids).flatten().tolist()]
    if not ids:
        raise ValueError("the prompt is empty: a request needs at least one token")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prompt ids {bad[:5]} are outside the model's vocabulary (0..{vocab_size - 1})")
    if len(ids) >= context:
        raise ValueError(f"a prompt of {len(ids)} tokens leaves no room to generate in the model's "
                         f"context of {context} tokens")
    return ids


def choose_tokens(logits: torch.Tensor, seqs: Sequence[SeqState]) -> list[int]:
    """The next token of each sequence from its last-position logits (B, vocab): greedy rows by one argmax,
    sampled rows from ``next_token_probs`` with each request's own settings and generator."""
    picks = logits.argmax(dim=-1).tolist()
    for b, seq in enumerate(seqs):
        p = seq.params
        if p.temperature > 0:
            probs = next_token_probs(logits[b : b + 1], p.temperature, p.top_k, p.top_p)
            picks[b] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return picks


def finish_if_done(seq: SeqState, context: int) -> bool:
    """Apply the stop conditions after a token was appended: a stop id, max_tokens, the model's context."""
    n = len(seq.tokens) - len(seq.prompt)
    if seq.tokens[-1] in seq.params.stop_ids:
        seq.finish_reason = "stop"
    elif n >= seq.params.max_tokens or len(seq.tokens) >= context:
        seq.finish_reason = "length"
    return seq.finished
