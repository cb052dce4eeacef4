"""The engine API every engine shares: add a request, step, stream outputs, abort.

An engine owns a queue of requests and a model. ``step()`` runs one scheduling iteration (one or two model
forwards) and returns the outputs that changed: new tokens for running requests, and requests that finished.
``stream()`` steps until nothing is left and yields those outputs; ``generate()`` is the offline form (all
prompts in, all outputs back in order). Subclasses decide what one step does (``StaticEngine``: a padded
batch run to its longest request; ``Engine``: iteration-level scheduling on a paged cache).

An exact-match response cache (``impl.prompt_caching.response_cache``), when given, answers a repeated
deterministic request (greedy, or seeded sampling) without running the model.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from impl.engine.request import RequestMetrics, RequestOutput, SamplingParams, SeqState, check_prompt, finish_if_done
from impl.gpt.model import GPT


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit: the request was not accepted (admission control)."""


class EngineBase:
    """Request bookkeeping shared by every engine; ``_step`` is the scheduling policy."""

    def __init__(self, model: GPT, *, max_queue: int | None = None, response_cache=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.model = model.eval()
        self.context = model.config.block_size
        self.device = next(model.parameters()).device
        self.max_queue = max_queue
        self.response_cache = response_cache
        self.clock = clock
        self.waiting: deque[SeqState] = deque()
        self.requests: dict[str, SeqState] = {}  # every unfinished request, waiting or running
        self._ready: list[SeqState] = []  # finished outside a step (response-cache hit, abort): reported next
        self.counters = {"steps": 0, "forwards": 0, "generated_tokens": 0, "preemptions": 0}
        self._next_id = 0
        self._unseeded = 0

    # --- the API ---------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` for a bad prompt or a duplicate id and
        ``QueueFull`` when ``max_queue`` requests already wait."""
        params = params or SamplingParams()
        prompt = check_prompt(prompt_ids, self.model.config.vocab_size, self.context)
        if request_id is None:
            request_id, self._next_id = f"req-{self._next_id}", self._next_id + 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); "
                            "retry later or raise max_queue")
        self.validate(prompt, params)
        seed = params.seed if params.seed is not None else self._unseeded
        self._unseeded += 1  # unseeded requests still draw reproducibly: one seed per request, in arrival order
        seq = SeqState(request_id, prompt, params, RequestMetrics(self.clock()),
                       torch.Generator().manual_seed(seed), tokens=list(prompt))
        cached = self.response_cache.get(prompt, params) if self.response_cache and params.deterministic else None
        if cached is not None:
            seq.tokens += cached.tokens
            seq.finish_reason = cached.finish_reason
            seq.metrics.response_cache_hit = True
            seq.metrics.first_token_s = seq.metrics.finish_s = self.clock()
            self._ready.append(seq)
            return request_id
        self.requests[request_id] = seq
        self.waiting.append(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now (waiting or running); its output, reported by the next step, ends with
        ``finish_reason == "abort"``. False if the id is unknown or already finished."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
        seq.finish_reason = "abort"
        seq.metrics.finish_s = self.clock()
        self._ready.append(seq)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running, or finished but not reported yet."""
        return bool(self.requests or self._ready)

    def step(self) -> list[RequestOutput]:
        """One scheduling iteration; the outputs of every request that got tokens or finished."""
        touched = self._ready
        self._ready = []
        if self.requests:
            self.counters["steps"] += 1
            touched = touched + self._step()
        outputs = []
        for seq in touched:
            if seq.finished and seq.finish_reason != "abort":
                self.requests.pop(seq.request_id, None)
                if self.response_cache is not None and seq.params.deterministic \
                        and not seq.metrics.response_cache_hit:
                    self.response_cache.put(seq.prompt, seq.params, seq.generated, seq.finish_reason)
            outputs.append(seq.output())
        return outputs

    def stream(self) -> Iterator[RequestOutput]:
        """Step until every request is finished, yielding each output as it changes."""
        while self.has_unfinished():
            yield from self.step()

    def generate(self, prompts: Iterable[Sequence[int] | torch.Tensor],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Offline use: queue every prompt, run to completion, return the final outputs in prompt order."""
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling settings for {len(prompts)} prompts")
        ids = [self.add_request(p, s) for p, s in zip(prompts, params, strict=True)]
        final = {out.request_id: out for out in self.stream() if out.finished}
        return [final[i] for i in ids]

    # --- what a subclass provides -------------------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Refuse a request this engine could never serve (e.g. larger than its whole cache)."""

    def release(self, seq: SeqState) -> None:
        """Give back whatever cache space ``seq`` holds."""

    def _step(self) -> list[SeqState]:
        raise NotImplementedError

    def emit(self, seq: SeqState, token: int) -> None:
        """Append a generated token, stamp the clock, apply the stop conditions (and release on finish)."""
        seq.tokens.append(token)
        self.counters["generated_tokens"] += 1
        now = self.clock()
        if seq.metrics.first_token_s is None:
            seq.metrics.first_token_s = now
        if finish_if_done(seq, self.context):
            seq.metrics.finish_s = now
            self.release(seq)
