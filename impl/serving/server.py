"""One worker's state behind the routes: its configuration, the model loaded on a background thread, the
engine thread, and what every generation request does (validate, tokenize, submit, detokenize, time out).

``app.py`` maps HTTP onto this; keeping it apart keeps each file readable in one sitting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from impl.engine.base import QueueFull
from impl.engine.request import SamplingParams
from impl.serving.async_engine import AsyncEngine, EngineError
from impl.serving.detokenize import IncrementalDetokenizer
from impl.serving.metrics import ServerMetrics
from impl.serving.protocol import APIError

log = logging.getLogger("impl.serving")
MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-6


@dataclass
class ServerConfig:
    """What ``python -m impl.serving api`` configures; ``model`` is a zoo name or a saved model directory."""

    model: str
    api_key: str | None = None
    max_queue: int | None = None
    max_num_seqs: int = 16
    max_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int | None = None
    prefix_caching: bool = False
    draft: str | None = None
    num_speculative: int = 4
    request_timeout_s: float | None = 600.0
    retry_after_s: int = 1
    max_body_bytes: int = 4 * 2**20  # larger bodies get 413 before any parsing
    device: str = "auto"  # "auto": CUDA when torch sees a GPU, else CPU

    def __post_init__(self) -> None:
        if self.draft and self.prefix_caching:  # the engine's speculative path caches partial blocks: it raises
            raise ValueError("--draft and --prefix-caching cannot be combined yet: the speculative engine does not "
                             "support prefix caching; drop one of them")

    @property
    def model_id(self) -> str:
        """The id clients send and see: the name, or a directory's basename."""
        return Path(self.model).name if Path(self.model).is_dir() else self.model


def build_engine(config: ServerConfig, model) -> Any:
    """The engine ``config`` describes around ``model`` (speculative when a draft model is named)."""
    from impl.engine.continuous import Engine

    knobs = dict(max_num_seqs=config.max_num_seqs, max_batched_tokens=config.max_batched_tokens,
                 block_size=config.block_size, num_blocks=config.num_blocks,
                 prefix_caching=config.prefix_caching, max_queue=config.max_queue)
    if config.draft:
        from impl.engine.speculative import SpeculativeEngine
        from impl.zoo import load_any

        draft, _, _ = load_any(config.draft)
        draft = draft.to(next(model.parameters()).device)
        return SpeculativeEngine(model, draft, num_speculative=config.num_speculative, **knobs)
    return Engine(model, **knobs)


def load_model(config: ServerConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``config.model`` (zoo name or directory), on ``config.device``."""
    import torch

    from impl.zoo import load_any

    model, tokenizer, _ = load_any(config.model)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer


class Server:
    """The state behind the routes: the loaded model, its engine thread, metrics."""

    def __init__(self, config: ServerConfig, loader: Callable[[ServerConfig], tuple[Any, Any]] = load_model,
                 detokenizer: type = IncrementalDetokenizer):
        self.config = config
        self.model_id = config.model_id
        self.loader, self.detokenizer = loader, detokenizer
        self.engine: AsyncEngine | None = None
        self.tokenizer = None
        self.context = 0
        self.load_error: str | None = None
        self.metrics: ServerMetrics | None = None
        self._loading: threading.Thread | None = None
        self._stopping = False

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loading = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loading.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            model, tokenizer = self.loader(self.config)
            engine = AsyncEngine(build_engine(self.config, model))
        except Exception as e:  # the server stays up and says why on /ready and in the log
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading model %r failed", self.config.model)
            return
        self.tokenizer, self.context = tokenizer, model.config.block_size
        from impl.sft.evaluate import stop_ids

        self.stop_ids = stop_ids(tokenizer) if hasattr(tokenizer, "special_tokens") else []
        if self._stopping:
            return
        engine.start()
        self.engine = engine
        log.info("model %s loaded in %.1f s: context %d tokens, vocab %d, %d KV blocks of %d", self.model_id,
                 time.perf_counter() - started, self.context, model.config.vocab_size,
                 engine.stats.kv_blocks_total, self.config.block_size)

    def stop(self) -> None:
        self._stopping = True
        if self._loading is not None:
            self._loading.join(60)
        if self.engine is not None:
            self.engine.stop()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.healthy

    def require_ready(self) -> AsyncEngine:
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "server_error",
                           code="model_load_failed")
        if not self.ready:
            raise APIError(503, "the model is still loading (or the engine is failing); retry shortly",
                           "server_error", code="not_ready", headers={"Retry-After": "1"})
        return self.engine

    # --- one generation -----------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt, allowed_special="all") if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty: send at least one token", param="prompt")
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {self.context} "
                           f"tokens, so a prompt may be at most {self.context - 1} tokens (it must leave room "
                           "for one generated token)", param="prompt", code="context_length_exceeded")
        return ids

    def sampling(self, body, max_tokens: int) -> SamplingParams:
        """The engine's settings for ``body``. Two clamps keep legal-but-extreme values from poisoning a
        batch (a NaN distribution fails the whole engine step): a temperature below ``MIN_TEMPERATURE`` is
        greedy (dividing logits by 1e-300 gives inf), and ``top_p`` below ``MIN_TOP_P`` is ``MIN_TOP_P`` (the
        sampler compares in float32, where 1e-300 is 0 and would drop every token; both keep only the most
        likely token anyway)."""
        temperature = 0.0 if body.temperature < MIN_TEMPERATURE else body.temperature
        top_p = None if body.top_p >= 1.0 else max(body.top_p, MIN_TOP_P)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=body.top_k, top_p=top_p,
                              seed=body.seed, stop_ids=() if body.ignore_eos else tuple(self.stop_ids))

    async def submit(self, prompt_ids: list[int], params: SamplingParams):
        engine = self.require_ready()
        try:
            return await engine.add(prompt_ids, params)
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e})", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from e
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        except EngineError as e:
            raise APIError(503, str(e), "server_error", code="engine_unavailable") from e

    async def pieces(self, stream, stop: list[str], endpoint: str, started: float,
                     counts: dict[str, int]) -> AsyncIterator[tuple[str, str | None]]:
        """``(text, finish_reason)`` pieces of one request's answer; the last has the finish reason."""
        detok = self.detokenizer(self.tokenizer, stop, skip_ids=self.stop_ids)
        first = True
        async for out in stream:
            if first and out.token_ids:
                self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - started)
                first = False
            counts["completion"] = len(out.token_ids)
            text = detok.add(out.new_token_ids)
            if detok.stopped:  # a stop string: the answer ends before it, the engine stops generating
                stream.abort()
                yield text, "stop"
                return
            if out.finished:
                reason = {"stop": "stop", "length": "length"}.get(out.finish_reason, out.finish_reason)
                yield text + detok.finish(), reason
                return
            if text:
                yield text, None

    async def collect(self, stream, stop: list[str], endpoint: str, started: float,
                      counts: dict[str, int]) -> tuple[str, str]:
        """The whole answer (non-streaming), within the request timeout."""
        parts, reason = [], None
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                async for text, finish in self.pieces(stream, stop, endpoint, started, counts):
                    parts.append(text)
                    reason = finish
        except TimeoutError as e:
            stream.abort()
            raise APIError(504, f"the request took longer than the server's timeout of "
                           f"{self.config.request_timeout_s} s; lower max_tokens", "timeout_error",
                           code="timeout") from e
        except EngineError as e:
            raise APIError(500, str(e), "server_error", code="engine_error") from e
        return "".join(parts), reason

    def finished(self, endpoint: str, started: float, counts: dict[str, int]) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.latency.labels(endpoint).observe(elapsed)
        self.metrics.completion_tokens.inc(counts.get("completion", 0))
        if elapsed > 0 and counts.get("completion"):
            self.metrics.tokens_per_s.set(counts["completion"] / elapsed)
