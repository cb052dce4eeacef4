"""Offline runs of each engine on a list of prompts: the callables specs 10 and 12 compare.

Each takes a model as ``(config, state)``, prompts (lists of ids), one ``max_tokens`` per prompt and shared
``stop_ids``, and returns every request's generated ids (a list of lists), greedy. ``alone`` runs each prompt by
itself through P8's cached ``decode`` (the truth: no batching at all); the engines take their knobs as keywords
and ignore the others', so every implementation can be called with the same case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from impl.engine.base import EngineBase
from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.engine.static import StaticEngine
from impl.gpt.model import GPT
from impl.kv_cache.fast import decode
from impl.prompt_caching.response_cache import ResponseCache

ENGINE_KNOBS = ("max_num_seqs", "max_batched_tokens", "block_size", "num_blocks", "prefix_caching")


def engine_knobs(knobs: dict) -> dict:
    """The keywords of a case that configure ``Engine`` (the others belong to other implementations)."""
    return {k: v for k, v in knobs.items() if k in ENGINE_KNOBS}


def _params(max_tokens: Sequence[int], stop_ids: Sequence[int]) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=n, stop_ids=tuple(stop_ids)) for n in max_tokens]


def alone(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[Sequence[int]],
          max_tokens: Sequence[int], stop_ids: Sequence[int] = (), **_knobs) -> list[list[int]]:
    """Each prompt generated on its own (batch of one, contiguous cache), cut after its first stop id."""
    model = GPT.from_state(config, state)
    outs = []
    for prompt, n in zip(prompts, max_tokens, strict=True):
        n = min(n, model.config.block_size - len(prompt))
        new = decode(model, torch.tensor([list(prompt)]), n, stop_ids=stop_ids).new_tokens[0].tolist()
        stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
        outs.append(new if stop is None else new[: stop + 1])
    return outs


def _offline(engine: EngineBase, prompts, max_tokens, stop_ids, arrive_at=None) -> list[list[int]]:
    """Run ``engine`` on the requests (request i added before step ``arrive_at[i]``, default all at once);
    their generated ids. A run that has not finished within a generous step budget (20 steps per token it
    could take, a correct engine needs at most about one) stops there and returns what each request has so
    far: a broken scheduler (starvation, a lost request) then gives wrong outputs instead of hanging."""
    params = _params(max_tokens, stop_ids)
    arrive_at = arrive_at or [0] * len(prompts)
    budget = 20 * sum(len(p) + n for p, n in zip(prompts, max_tokens, strict=True)) + max(arrive_at) + 100
    order = sorted(range(len(prompts)), key=lambda i: arrive_at[i])
    ids: dict[int, str] = {}
    latest: dict[str, list[int]] = {}
    finished: set[str] = set()
    for step in range(budget):
        while order and arrive_at[order[0]] <= step:
            i = order.pop(0)
            ids[i] = engine.add_request(prompts[i], params[i])
            latest[ids[i]] = []
        for out in engine.step():
            latest[out.request_id] = out.token_ids
            if out.finished:
                finished.add(out.request_id)
        if len(finished) == len(prompts):
            break
    return [latest.get(ids.get(i), []) for i in range(len(prompts))]


def continuous(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[Sequence[int]],
               max_tokens: Sequence[int], stop_ids: Sequence[int] = (), **knobs) -> list[list[int]]:
    """All prompts through the continuous-batching engine at once (``knobs``: its settings)."""
    engine = Engine(GPT.from_state(config, state), **engine_knobs(knobs))
    return _offline(engine, prompts, max_tokens, stop_ids)


def static(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[Sequence[int]],
           max_tokens: Sequence[int], stop_ids: Sequence[int] = (), max_num_seqs: int = 4,
           **_knobs) -> list[list[int]]:
    """All prompts through the static-batching engine, ``max_num_seqs`` per batch."""
    return _offline(StaticEngine(GPT.from_state(config, state), max_batch=max_num_seqs), prompts, max_tokens,
                    stop_ids)


def shallow_draft(model: GPT, n_layer: int = 1) -> GPT:
    """A draft sharing ``model``'s tokenizer and weights but only its first ``n_layer`` blocks (it agrees
    with the target often, not always: every accept / reject path runs)."""
    config = model.config.to_dict() | {"n_layer": n_layer}
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < n_layer}
    return GPT.from_state(config, keep)


def speculative(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[Sequence[int]],
                max_tokens: Sequence[int], stop_ids: Sequence[int] = (), num_speculative: int = 3,
                **knobs) -> list[list[int]]:
    """All prompts through the continuous engine with speculative decoding (a one-block draft of the model)."""
    from impl.engine.speculative import SpeculativeEngine

    model = GPT.from_state(config, state)
    engine = SpeculativeEngine(model, shallow_draft(model), num_speculative=num_speculative,
                               **engine_knobs(knobs))
    return _offline(engine, prompts, max_tokens, stop_ids)


def cached_twice(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[Sequence[int]],
                 max_tokens: Sequence[int], stop_ids: Sequence[int] = (), **knobs) -> list[list[int]]:
    """Prefix caching and the response cache on: every prompt is served twice by one engine (the second
    round hits both caches); the second round's outputs, which must equal an uncached run's."""
    engine = Engine(GPT.from_state(config, state), response_cache=ResponseCache(),
                    **engine_knobs(knobs) | {"prefix_caching": True})
    first = _offline(engine, prompts, max_tokens, stop_ids)
    second = _offline(engine, prompts, max_tokens, stop_ids)
    if engine.response_cache.hits != len(prompts):
        raise AssertionError(f"the repeated round hit the response cache {engine.response_cache.hits} times, "
                             f"expected {len(prompts)}")
    return second if second == first else first + second  # a mismatch between rounds fails the comparison


def arrivals(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[Sequence[int]],
             max_tokens: Sequence[int], arrive_at: Sequence[int], stop_ids: Sequence[int] = (),
             **knobs) -> list[list[int]]:
    """Requests added while the continuous engine runs: request i arrives before step ``arrive_at[i]``."""
    engine = Engine(GPT.from_state(config, state), **engine_knobs(knobs))
    return _offline(engine, prompts, max_tokens, stop_ids, arrive_at)
