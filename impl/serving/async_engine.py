"""The bridge between the asyncio server and the engine: one thread owns the engine, requests talk to it by
messages.

``impl.engine`` is synchronous and not thread-safe: ``step()`` mutates the queue, the block tables and every
request's tokens. The server is asyncio: many requests, each awaiting its own tokens. So exactly one thread
(the *engine thread*) ever touches the engine. It runs ``step()`` while there is work and sleeps on a
condition when there is none. Requests reach it through a command queue (add, abort), and each step's outputs
travel back to the request that owns them through that request's own ``asyncio.Queue``, handed over with
``loop.call_soon_threadsafe`` (the only safe way to wake an event loop from another thread).

Why not ``run_in_executor(engine.step)`` from the event loop? Then two requests would race to step the same
engine, or one coroutine would have to be "the stepper", which is this thread with extra steps. Batching
happens because the engine thread sees every queued request at each step: continuous batching needs one
loop over the whole engine, not one per request.

Failure handling: ``add_request`` errors (a bad prompt, ``QueueFull``) are raised to the caller before any
response byte is sent (so the server can answer 400 / 429). An exception inside ``step()`` fails every
unfinished request with that error (each sees ``EngineError``), the engine is told to abort them so their
blocks return, and the loop keeps serving; ``healthy`` turns False after ``max_consecutive_errors`` failed
steps in a row, which the server shows on ``/ready``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from impl.engine.request import RequestOutput, SamplingParams

log = logging.getLogger("impl.serving.engine")


class EngineError(RuntimeError):
    """The engine failed while running this request (the step raised); the request is over."""


@dataclass
class EngineStats:
    """A snapshot the engine thread publishes after every step (read by /metrics without locking)."""

    waiting: int = 0
    running: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    prefix_hit_rate: float = 0.0
    generated_tokens: int = 0
    steps: int = 0
    step_errors: int = 0
    aborted: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class RequestStream:
    """The outputs of one request, as an async iterator of ``RequestOutput`` (the last one has
    ``finished=True``). Leaving the iteration early (``aclose()``, a cancelled task) aborts the request in
    the engine, so a client that goes away frees its cache blocks."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream):
        self.engine, self.request_id, self._stream = engine, request_id, stream

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self._stream.queue.get()
                if isinstance(item, BaseException):
                    self._stream.finished = True
                    raise item
                if item.finished:
                    self._stream.finished = True
                yield item
                if item.finished:
                    return
        finally:
            if not self._stream.finished:  # the consumer left early: the engine must stop and free the blocks
                self.engine.abort(self.request_id)

    def abort(self) -> None:
        """Stop the request now (e.g. a stop string was found); its blocks go back to the pool."""
        if not self._stream.finished:
            self._stream.finished = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Runs ``engine`` on its own thread; ``await add(prompt_ids, params)`` returns a ``RequestStream``."""

    def __init__(self, engine, max_consecutive_errors: int = 3):
        self.engine = engine
        self.max_consecutive_errors = max_consecutive_errors
        self.stats = EngineStats()
        self._commands: deque = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._consecutive_errors = 0
        self._ids = 0
        self._publish_stats()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        """The engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Alive and not failing step after step (``/ready``)."""
        return self.running and self._consecutive_errors < self.max_consecutive_errors

    # --- what requests call (event loop side) -------------------------------------------------------------------
    async def add(self, prompt_ids: Sequence[int], params: SamplingParams,
                  request_id: str | None = None) -> RequestStream:
        """Queue a request; raises what ``engine.add_request`` raises (``ValueError``, ``QueueFull``)."""
        if not self.running:
            raise EngineError("the engine thread is not running")
        if request_id is None:
            self._ids += 1
            request_id = f"req-{self._ids}"
        stream = _Stream(asyncio.get_running_loop())
        accepted: Future = Future()
        self._send(("add", request_id, list(prompt_ids), params, stream, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # the client left before the engine took the request: undo it
            self.abort(request_id)
            raise
        return RequestStream(self, request_id, stream)

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort ``request_id`` (no-op when it already finished)."""
        self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # --- the engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("engine thread started")
        while True:
            with self._wake:
                while not self._stopping and not self._commands and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopping:
                    break
                commands = list(self._commands)
                self._commands.clear()
            try:
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished():
                    self._step()
            except Exception as e:  # a bug outside step(): never let the thread die with requests waiting on it
                log.exception("engine loop error; failing %d requests", len(self._streams))
                self._consecutive_errors += 1
                for request_id in list(self._streams):
                    self._fail(request_id, EngineError(f"the engine loop failed: {type(e).__name__}: {e}"))
        for request_id in list(self._streams):  # shutting down: nobody is left to serve them
            self._fail(request_id, EngineError("the server is shutting down"))
        log.info("engine thread stopped")

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, stream, accepted = command
            try:
                self.engine.add_request(prompt, params, request_id=request_id)
            except Exception as e:  # a refused request: the caller answers 4xx / 429
                _resolve(accepted, e)
                return
            self._streams[request_id] = stream
            _resolve(accepted, None)
        elif command[0] == "abort":
            if self.engine.abort(command[1]):
                self.stats.aborted += 1

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._consecutive_errors += 1
            self.stats.step_errors += 1
            log.exception("engine step failed; failing its %d unfinished requests", len(self._streams))
            for request_id in list(self._streams):
                self._fail(request_id, EngineError(f"the engine failed: {type(e).__name__}: {e}"))
            self._publish_stats()
            return
        self._consecutive_errors = 0
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            _deliver(stream, out)
        self._publish_stats()

    def _fail(self, request_id: str, error: Exception) -> None:
        stream = self._streams.pop(request_id)
        try:
            self.engine.abort(request_id)
        except Exception:  # the engine is in a bad state already; the request is failed either way
            log.exception("abort of %s failed", request_id)
        self.engine.requests.pop(request_id, None)
        _deliver(stream, error)

    def _publish_stats(self) -> None:
        engine = self.engine
        allocator = engine.cache.allocator
        prefix = engine.prefix_stats() if hasattr(engine, "prefix_stats") else {}
        self.stats = EngineStats(
            waiting=len(engine.waiting), running=len(getattr(engine, "running", ())),
            kv_blocks_free=allocator.num_free, kv_blocks_total=allocator.num_blocks,
            prefix_hit_rate=float(prefix.get("hit_rate", 0.0) or 0.0),
            generated_tokens=engine.counters["generated_tokens"], steps=engine.counters["steps"],
            step_errors=self.stats.step_errors, aborted=self.stats.aborted)


def _deliver(stream: _Stream, item: object) -> None:
    """Hand ``item`` to the request's event loop; a loop already closed (its client is gone) is skipped."""
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:
        pass


def _resolve(future: Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
