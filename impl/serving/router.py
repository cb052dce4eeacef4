"""A least-outstanding-requests load balancer in front of >= 2 API workers (project 28).

Each request goes to the ready worker with the fewest requests in flight through this router (ties: the
one routed to least), because a generation's cost is unknown up front: round robin would pile short
chats behind a long one, while counting what is still open follows the real load. The body is passed
through unchanged (each SSE event leaves as soon as it is whole), and so is the ``Authorization`` header: the
workers check the key, the router never reads or logs it.

Failure handling, and what a client sees:
- a worker that cannot be reached (connection refused, or it closed the connection before sending any
  response byte) is ejected and the request is replayed on another worker: nothing reached the client
  yet, and a generation has no side effect beyond its compute, so a replay is safe;
- a streamed generation whose worker dies mid-response is resumed: the router sends the same request to
  another worker and passes on only the text the client has not seen, under the stream's own id. That
  is only correct when the replay produces the same tokens, so (a) the request must be reproducible:
  greedy, or seeded; a sampled request without a seed gets a random seed from the router on the way in;
  (b) the replay's text is checked against everything already sent, and a replay that disagrees (a
  near-tie flipped by other rounding) is not spliced: the stream then ends with an OpenAI-shaped error
  event (``worker_failed``) and ``[DONE]``, as a worker ends a failed stream. Non-SSE bodies are never
  spliced: a truncated one breaks the connection, so a failure is visible, never silently patched;
- a client that disconnects closes the upstream stream, so the worker sees the disconnect and aborts
  the request (its KV blocks are freed);
- a background task polls every worker's ``/ready`` and puts ejected ones back when they answer.

``--workers N --model M`` also supervises: it spawns N ``python -m impl.serving api`` processes on free
ports, reads each one's URL from its ``serving on http://...`` line, and restarts a worker that exits
(backoff 0.5 s doubling to 8 s, reset after a minute up). Children die with the router (PR_SET_PDEATHSIG)
and are terminated on Ctrl-C / SIGTERM.

    python -m impl.serving router --port 8000 --worker http://127.0.0.1:8001 --worker http://127.0.0.1:8002
    python -m impl.serving router --port 8000 --workers 2 --model chat -- --max-num-seqs 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

URL_LINE = re.compile(r"serving on (http://\S+)")
# Hop-by-hop headers (RFC 9110 7.6.1) and the length, which no longer holds once the body is re-chunked.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "host", "content-length"}
# Failures that happen before any response byte: the request never started on that worker, replay it.
NOT_STARTED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
               httpx.WriteError)


def error_body(message: str, kind: str, code: str) -> dict:
    """An OpenAI-shaped error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class Worker:
    """One upstream API server. ``url`` changes when a supervised worker restarts on a new port."""

    index: int
    url: str = ""
    ready: bool = False
    outstanding: int = 0
    routed: int = 0
    pid: int | None = None
    restarts: int = 0
    ever_ready: bool = False  # since its last (re)start
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)


@dataclass
class Replay:
    """What it takes to send a request again: to another worker before it was answered, or to resume it."""

    method: str
    path: str
    body: bytes
    headers: list[tuple[str, str]]
    params: object
    tried: set[int] = field(default_factory=set)


def reproducible(body: bytes, method: str, path: str) -> tuple[bytes, bool]:
    """``(body to send, resumable)``. A streamed generation can be resumed on another worker when its tokens
    are reproducible: greedy (temperature 0) or seeded (the engine samples each request from its own seeded
    generator, whatever it is batched with). A sampled request without a seed is given a random one here,
    so it is reproducible too; its answer is as random as before."""
    if method != "POST" or not path.endswith("completions"):
        return body, False
    try:
        request = json.loads(body)
    except ValueError:
        return body, False
    if not isinstance(request, dict) or request.get("stream") is not True:
        return body, False
    if request.get("seed") is None and request.get("temperature", 1.0) != 0:
        request["seed"] = random.randrange(2**62)
        body = json.dumps(request).encode()
    return body, True


async def events_of(response: httpx.Response, sse: bool) -> AsyncIterator[bytes]:
    """The response's body as whole SSE events (``...\\n\\n``), or as raw chunks when it is not SSE."""
    buf = bytearray()
    async for chunk in response.aiter_raw():
        if not sse:
            yield chunk
            continue
        buf += chunk
        while (end := buf.find(b"\n\n")) >= 0:
            yield bytes(buf[:end + 2])
            del buf[:end + 2]
    if buf:  # the body ended inside an event: treat it as the worker failing, never pass half an event on
        raise httpx.RemoteProtocolError("the stream ended in the middle of an event")


def worker_failed_event(message: str) -> bytes:
    """An OpenAI-shaped error event, then [DONE], as a worker ends a stream that failed after its first byte."""
    body = error_body(f"{message}; resend the request", "server_error", "worker_failed")
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class SpliceMismatch(Exception):
    """The replayed answer differs from what the client already received: it cannot be continued."""


@dataclass
class Said:
    """What one stream has told its client so far: its id, whether the role came, the text, whether it
    ended. ``splice`` turns a replay's events into the continuation of this stream."""

    id: str | None = None
    role: bool = False
    text: str = ""
    finished: bool = False

    def note(self, event: bytes) -> None:
        data = event.strip()[len(b"data: "):] if event.startswith(b"data: ") else b""
        if data == b"[DONE]":
            self.finished = True
        if not data or data == b"[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            return
        if "error" in chunk:
            self.finished = True  # the worker itself ended the stream with an error: not ours to redo
            return
        self.id = chunk.get("id", self.id)
        for choice in chunk.get("choices") or []:
            self.role = self.role or "role" in (choice.get("delta") or {})
            self.text += piece_of(choice)
            self.finished = self.finished or choice.get("finish_reason") is not None

    def splice(self, event: bytes, replayed: Said) -> bytes | None:
        """The part of the replay's ``event`` the client has not seen, under this stream's id (None: nothing
        new). Raises SpliceMismatch when the replay's text disagrees with what was sent."""
        data = event.strip()[len(b"data: "):] if event.startswith(b"data: ") else b""
        if not data or data == b"[DONE]":
            return event
        chunk = json.loads(data)
        if "error" in chunk:
            return event
        if self.id is not None:
            chunk["id"] = self.id
        keep = not chunk.get("choices")  # the usage chunk: counts of the whole (replayed) answer
        for choice in chunk.get("choices") or []:
            replayed.text += piece_of(choice)
            n = min(len(replayed.text), len(self.text))
            if replayed.text[:n] != self.text[:n]:
                raise SpliceMismatch(f"replay diverged after {n} characters")
            new = replayed.text[len(self.text):]
            self.text += new
            delta = choice.get("delta")
            if delta is not None:
                if self.role:
                    delta.pop("role", None)
                self.role = True
                if "content" in delta:
                    delta["content"] = new
            elif "text" in choice:
                choice["text"] = new
            keep = keep or bool(new) or choice.get("finish_reason") is not None or bool(delta and delta.get("role"))
        return f"data: {json.dumps(chunk)}\n\n".encode() if keep else None


def piece_of(choice: dict) -> str:
    """The text a stream chunk's choice carries (chat: ``delta.content``; completions: ``text``)."""
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


class Router:
    """The balancing state and the upstream client, shared by the app's handlers."""

    def __init__(self, urls: Sequence[str] = (), health_interval_s: float = 0.5):
        self.workers = [Worker(i, url.rstrip("/")) for i, url in enumerate(urls)]
        self.health_interval_s = health_interval_s
        self.client: httpx.AsyncClient | None = None
        self.registry = CollectorRegistry()
        labels = ["worker"]
        self.m_outstanding = Gauge("router_outstanding_requests", "Requests in flight per worker", labels,
                                   registry=self.registry)
        self.m_ready = Gauge("router_worker_ready", "1 when the worker answers /ready", labels,
                             registry=self.registry)
        self.m_routed = Counter("router_routed_requests", "Requests sent to each worker", labels,
                                registry=self.registry)
        self.m_retries = Counter("router_retries", "Requests replayed on another worker after a failure "
                                 "before any response byte", registry=self.registry)
        self.m_ejections = Counter("router_ejections", "Times a worker was marked not ready", labels,
                                   registry=self.registry)
        self.m_restarts = Counter("router_worker_restarts", "Supervised worker restarts", labels,
                                  registry=self.registry)
        self.m_resumed = Counter("router_resumed_streams", "Streams whose worker died mid-response, replayed "
                                 "on another worker (one that then disagrees also counts as failed)",
                                 registry=self.registry)
        self.m_failed = Counter("router_failed_requests", "Requests answered with an error by the router or "
                                "cut mid-response", registry=self.registry)

    # --- picking and bookkeeping -------------------------------------------------------------------
    def pick(self, exclude: set[int]) -> Worker | None:
        """The ready worker with the fewest requests in flight (ties: fewest routed), or None."""
        ready = [w for w in self.workers if w.ready and w.url and w.index not in exclude]
        if not ready:
            return None
        worker = min(ready, key=lambda w: (w.outstanding, w.routed, w.index))
        worker.outstanding += 1
        worker.routed += 1
        self.m_routed.labels(str(worker.index)).inc()
        self.m_outstanding.labels(str(worker.index)).set(worker.outstanding)
        return worker

    def release(self, worker: Worker) -> None:
        worker.outstanding -= 1
        self.m_outstanding.labels(str(worker.index)).set(worker.outstanding)

    def set_ready(self, worker: Worker, ready: bool) -> None:
        if worker.ready and not ready:
            self.m_ejections.labels(str(worker.index)).inc()
        worker.ready = ready
        worker.ever_ready = worker.ever_ready or ready
        self.m_ready.labels(str(worker.index)).set(int(ready))

    # --- health ------------------------------------------------------------------------------------
    async def check(self, worker: Worker) -> None:
        if not worker.url:
            self.set_ready(worker, False)
            return
        try:
            r = await self.client.get(f"{worker.url}/ready", timeout=2.0)
            self.set_ready(worker, r.status_code == 200)
        except httpx.HTTPError:
            self.set_ready(worker, False)

    async def health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check(w) for w in self.workers))
            await asyncio.sleep(self.health_interval_s)

    # --- proxying ----------------------------------------------------------------------------------
    async def open_upstream(self, replay: Replay) -> tuple[Worker, httpx.Response] | None:
        """Send ``replay``'s request to the least-loaded ready worker not in ``replay.tried``, trying the next
        one when a worker fails before answering; None when none is left. The worker is held (outstanding)
        until the caller releases it."""
        while True:
            worker = self.pick(replay.tried)
            if worker is None:
                return None
            replay.tried.add(worker.index)
            upstream = self.client.build_request(replay.method, f"{worker.url}/{replay.path}", content=replay.body,
                                                 headers=replay.headers, params=replay.params)
            try:
                return worker, await self.client.send(upstream, stream=True)
            except NOT_STARTED as e:
                self.release(worker)
                if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
                    self.set_ready(worker, False)  # ejected until the health loop sees it ready again
                self.m_retries.inc()
            except BaseException:
                self.release(worker)
                raise

    async def forward(self, request: Request, path: str) -> Response:
        """Send the request to the least-loaded ready worker, replaying it elsewhere when a worker fails
        before answering; stream the answer back as it comes."""
        body, resumable = reproducible(await request.body(), request.method, path)
        replay = Replay(request.method, path, body, [(k, v) for k, v in request.headers.items()
                                                     if k.lower() not in HOP_HEADERS], request.query_params)
        opened = await self.open_upstream(replay)
        if opened is None:
            self.m_failed.inc()
            what = "no worker is ready" if len(replay.tried) == 0 else f"all {len(replay.tried)} ready workers failed"
            return JSONResponse(error_body(f"{what}; retry in a few seconds", "service_unavailable",
                                           "no_ready_worker"), status_code=503)
        worker, response = opened
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        out_headers["x-upstream-worker"] = str(worker.index)
        return ProxiedResponse(self, worker, response, out_headers,
                               replay if resumable and response.status_code == 200 else None)

    async def models(self, headers: dict[str, str]) -> Response:
        """The union of the ready workers' /v1/models lists (they serve the same model); ``headers`` carry the
        client's Authorization, so a worker's 401 comes back as it is."""
        seen: dict[str, dict] = {}
        for worker in [w for w in self.workers if w.ready]:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                r = await self.client.get(f"{worker.url}/v1/models", timeout=5.0, headers=headers)
                if r.status_code != 200:
                    return Response(r.content, status_code=r.status_code, media_type="application/json")
                for model in r.json()["data"]:
                    seen.setdefault(model["id"], model)
        if not seen:
            return JSONResponse(error_body("no worker is ready; retry in a few seconds", "service_unavailable",
                                           "no_ready_worker"), status_code=503)
        return JSONResponse({"object": "list", "data": list(seen.values())})


class ProxiedResponse(StreamingResponse):
    """Streams an upstream response and, however it ends (done, client gone, upstream dead), closes the
    upstream stream and releases the worker. Closing the upstream connection is what tells the worker
    that the client left. SSE is passed on whole event by whole event, so that a stream whose worker dies
    can be resumed from an event boundary (``resume``)."""

    def __init__(self, router: Router, worker: Worker, upstream: httpx.Response, headers: dict[str, str],
                 replay: Replay | None = None):
        self.router, self.worker, self.upstream, self.replay = router, worker, upstream, replay
        self.sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        super().__init__(self.relay(), status_code=upstream.status_code, headers=headers)

    async def relay(self) -> AsyncIterator[bytes]:
        sent = Said()
        try:
            async for event in events_of(self.upstream, self.sse):
                if self.replay is not None:
                    sent.note(event)
                yield event
        except httpx.HTTPError as e:
            self.router.set_ready(self.worker, False)
            if not self.sse:
                self.router.m_failed.inc()
                raise  # the client sees a broken connection: a truncated body is never passed as whole
            if self.replay is not None and not sent.finished:
                async for event in self.resume(sent):
                    yield event
                return
            self.router.m_failed.inc()
            yield worker_failed_event(f"the worker serving this stream failed mid-response ({type(e).__name__})")

    async def resume(self, sent: Said) -> AsyncIterator[bytes]:
        """Replay the request on another worker and pass on only what the client has not seen yet, after
        checking that the replay agrees with everything it has seen (same seed or greedy: same tokens)."""
        while (opened := await self.router.open_upstream(self.replay)) is not None:
            self.router.release(self.worker)
            await self.upstream.aclose()
            self.worker, self.upstream = opened
            if self.upstream.status_code != 200:
                break
            self.router.m_resumed.inc()  # counted now: a client that has its [DONE] may hang up at once
            replayed = Said()
            try:
                async for event in events_of(self.upstream, True):
                    out = sent.splice(event, replayed)
                    if out:
                        yield out
                return
            except httpx.HTTPError:
                self.router.set_ready(self.worker, False)  # that one died too: try the next
            except SpliceMismatch:
                break
        self.router.m_failed.inc()
        yield worker_failed_event("the worker serving this stream failed mid-response and no other worker "
                                  "could resume it")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            self.router.release(self.worker)


def build_app(router: Router, supervisor: Supervisor | None = None) -> FastAPI:
    """The router's ASGI app: /v1/* proxied, /v1/models merged, its own /health, /ready, /metrics,
    /router/workers."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        router.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=3.0),
                                          limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        tasks = [asyncio.create_task(router.health_loop())]
        if supervisor is not None:
            tasks.append(asyncio.create_task(supervisor.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if supervisor is not None:
                await supervisor.stop()
            await router.client.aclose()

    app = FastAPI(title="impl.serving router", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        n = sum(w.ready for w in router.workers)
        body = {"ready_workers": n, "workers": len(router.workers)}
        return JSONResponse(body, status_code=200 if n else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/router/workers")
    async def workers() -> list[dict]:
        """Each worker's state: for operators, and for the soak benchmark (which worker to kill)."""
        return [{"index": w.index, "url": w.url, "ready": w.ready, "outstanding": w.outstanding,
                 "routed": w.routed, "pid": w.pid, "restarts": w.restarts} for w in router.workers]

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await router.models({k: v for k, v in request.headers.items() if k.lower() == "authorization"})

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def proxy(path: str, request: Request) -> Response:
        return await router.forward(request, f"v1/{path}")

    return app


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the router dies, even by SIGKILL (no orphans)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Keeps one ``python -m impl.serving api`` process alive per worker slot."""

    def __init__(self, router: Router, n: int, model: str, api_args: Sequence[str] = (),
                 start_timeout_s: float = 600.0, max_failed_starts: int = 2):
        self.router, self.model, self.api_args = router, model, list(api_args)
        if not any(a.startswith("--log-level") for a in self.api_args):
            self.api_args += ["--log-level", "warning"]  # the health checks would log every half second
        self.start_timeout_s, self.max_failed_starts = start_timeout_s, max_failed_starts
        self.fatal: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None
        router.workers = [Worker(i) for i in range(n)]
        self.stopping = False

    async def spawn(self, worker: Worker) -> None:
        """Start the worker's process and wait for its URL line; raises on exit or timeout."""
        cmd = [sys.executable, "-m", "impl.serving", "api", "--model", self.model, "--host", "127.0.0.1",
               "--port", "0", *self.api_args]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=None,
                                                    preexec_fn=_die_with_parent)
        worker.process, worker.pid = proc, proc.pid
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
            if not line:
                raise RuntimeError(f"worker {worker.index} exited (code {await proc.wait()}) before serving")
            sys.stdout.write(f"[worker {worker.index}] {line.decode(errors='replace')}")
            found = URL_LINE.search(line.decode(errors="replace"))
            if found:
                worker.url = found.group(1).rstrip("/")
                break
        asyncio.create_task(self._drain(proc, worker.index))
        await self.wait_loaded(worker, deadline)

    async def wait_loaded(self, worker: Worker, deadline: float) -> None:
        """Poll the new worker's /ready until the model is loaded. A worker that failed to load its model
        stays up answering 503 with the error as its reason (not "loading"): that is a failed start."""
        while time.monotonic() < deadline and worker.process.returncode is None:
            try:
                r = await self.router.client.get(f"{worker.url}/ready", timeout=2.0)
                if r.status_code == 200:
                    self.router.set_ready(worker, True)
                    return
                reason = r.json().get("reason", "")
                if reason not in ("loading", "engine failing"):
                    raise RuntimeError(f"it could not load its model: {reason}")
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            await asyncio.sleep(0.2)
        if worker.process.returncode is not None:
            raise RuntimeError(f"it exited with code {worker.process.returncode} while loading")
        raise RuntimeError(f"not ready after {self.start_timeout_s:.0f} s")

    @staticmethod
    async def _drain(proc: asyncio.subprocess.Process, index: int) -> None:
        """Keep reading the worker's stdout so a full pipe never blocks it."""
        while line := await proc.stdout.readline():
            sys.stdout.write(f"[worker {index}] {line.decode(errors='replace')}")

    async def keep_alive(self, worker: Worker) -> None:
        """Start the slot's worker, restart it whenever it exits. A slot whose worker never got ready in
        ``max_failed_starts`` tries is a configuration error (a bad model name): the router gives up."""
        backoff, served, failed_starts = 0.5, False, 0
        while not self.stopping:
            if worker.process is not None:
                worker.restarts += 1
                self.router.m_restarts.labels(str(worker.index)).inc()
            started = time.monotonic()
            worker.ever_ready = False
            reason = ""
            try:
                await self.spawn(worker)
                code = await worker.process.wait()
                reason = f"exited with code {code}"
                print(f"router: worker {worker.index} (pid {worker.pid}) {reason}", flush=True)
            except (RuntimeError, asyncio.TimeoutError, OSError) as e:
                reason = str(e)
                print(f"router: worker {worker.index} failed to start: {e}", flush=True)
                if worker.process and worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
            self.router.set_ready(worker, False)
            worker.url = ""
            served = served or worker.ever_ready
            failed_starts = 0 if worker.ever_ready else failed_starts + 1
            if not served and failed_starts >= self.max_failed_starts:
                self.fatal = f"worker {worker.index} never got ready in {failed_starts} tries; last: {reason}"
                self.on_fatal()
                return
            if self.stopping:
                return
            up_s = time.monotonic() - started
            if up_s > 60:
                backoff = 0.5  # it ran a good while: a fresh crash, not a crash loop
            if up_s < 5:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 8.0)

    async def run(self) -> None:
        await asyncio.gather(*(self.keep_alive(w) for w in self.router.workers))

    async def stop(self) -> None:
        """SIGTERM every worker, SIGKILL the ones still alive after 10 s."""
        self.stopping = True
        procs = [w.process for w in self.router.workers if w.process and w.process.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Least-outstanding-requests load balancer over "
                                "OpenAI-compatible API workers: either existing ones (--worker URL, repeated) "
                                "or N it starts and supervises (--workers N --model M). Arguments after '--' "
                                "go to every spawned 'api' worker (e.g. -- --max-num-seqs 32 --api-key K).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--worker", action="append", default=[], metavar="URL",
                   help="an existing worker's base URL, e.g. http://127.0.0.1:8001 (repeat for each)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="spawn and supervise N api workers")
    p.add_argument("--model", default=None, help="model name or directory for spawned workers")
    p.add_argument("--health-interval", type=float, default=0.5, metavar="S",
                   help="seconds between /ready polls of each worker (default 0.5)")
    args, extra = p.parse_known_args(argv)
    args.api_args = [a for a in extra if a != "--"]
    if args.worker and args.workers:
        p.error("give either --worker URL (existing workers) or --workers N (spawned), not both")
    if not args.worker and not args.workers:
        p.error("no workers: give --worker URL at least once, or --workers N --model M")
    if args.workers and not args.model:
        p.error("--workers N needs --model NAME_OR_DIR for the workers it spawns")
    if args.worker and args.api_args:
        p.error(f"unknown arguments {args.api_args}: worker arguments only apply with --workers N")
    for url in args.worker:
        if not re.fullmatch(r"https?://[^/\s]+/?", url):
            p.error(f"--worker {url!r} is not a base URL like http://127.0.0.1:8001")
    return args


def main(argv: Sequence[str] | None = None, prog: str = "python -m impl.serving router") -> int:
    import socket

    import uvicorn

    args = parse_args(argv, prog)
    router = Router(args.worker, health_interval_s=args.health_interval)
    supervisor = Supervisor(router, args.workers, args.model, args.api_args) if args.workers else None
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(build_app(router, supervisor), log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if supervisor is not None:
        supervisor.on_fatal = lambda: setattr(server, "should_exit", True)
    print(f"routing on http://{host}:{port} ({args.workers or len(args.worker)} workers)", flush=True)
    server.run(sockets=[sock])
    if supervisor is not None and supervisor.fatal:
        print(f"router: giving up: {supervisor.fatal}", file=sys.stderr, flush=True)
        sys.exit(1)  # the dispatcher in __main__ ignores return values
    return 0
