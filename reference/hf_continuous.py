"""HF transformers' own continuous batching (the manager behind ``generate_batch``): the peer our engine races.

``HFContinuousBatching`` starts one manager (``continuous_batching_context_manager``, with its warm-up) and
``serve`` runs a set of requests through it, each with its own ``max_new_tokens`` and no end-of-sequence id,
greedy; it returns each request's generated ids and the wall time from the first request queued to the last
result. The manager's start-up is outside that time, as our engine's construction is outside its timing, and
one manager serves every round of a benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from transformers import GenerationConfig, GPT2LMHeadModel
from transformers.generation.configuration_utils import ContinuousBatchingConfig


class HFContinuousBatching:
    """A running HF continuous-batching manager over ``hf`` (use as a context manager)."""

    def __init__(self, hf: GPT2LMHeadModel, max_new_tokens: int, max_requests_per_batch: int = 16,
                 max_batch_tokens: int = 512, timeout_s: float = 600.0):
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
        batching = ContinuousBatchingConfig(max_requests_per_batch=max_requests_per_batch,
                                            max_batch_tokens=max_batch_tokens)
        self._context = hf.continuous_batching_context_manager(
            generation_config=config, continuous_batching_config=batching, block=True, timeout=5)
        self.timeout_s = timeout_s

    def __enter__(self) -> HFContinuousBatching:
        self.manager = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def serve(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> tuple[list[list[int]], float]:
        """Greedy generation of every prompt; (generated ids per request, seconds)."""
        results: dict[str, list[int]] = {}
        start = time.perf_counter()
        ids = [self.manager.add_request(list(p), max_new_tokens=n, eos_token_id=-1)
               for p, n in zip(prompts, max_new_tokens, strict=True)]
        while len(results) < len(ids):
            if time.perf_counter() - start > self.timeout_s:
                raise TimeoutError(f"HF continuous batching finished {len(results)} of {len(ids)} requests "
                                   f"in {self.timeout_s:.0f} s")
            result = self.manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = list(result.generated_tokens)
            elif result is None and not self.manager.is_running():
                raise RuntimeError("HF's continuous batching thread stopped before every request finished")
        return [results[i] for i in ids], time.perf_counter() - start
