"""Project 28 claims: the OpenAI-compatible server under load, on loopback, with real processes.

- batched throughput: 32 asyncio clients, each sending chat requests back to back (streamed, greedy,
  ``ignore_eos`` so every answer has exactly ``max_tokens`` tokens), against one API worker with continuous
  batching (32 rows) and then the same worker limited to one row (one request at a time);
- a soak through the router with 2 supervised workers: clients that hang up mid-stream, one worker killed
  with SIGKILL mid-run; every request is accounted for, and the KV blocks are all free afterwards;
- /metrics against what the clients saw: requests and tokens counted by the workers vs sent and received;
- the peer: llama.cpp's server (llama-cpp-python) on the same weights converted to GGUF, same workload.

Every server is a child process started here on a free port and killed in a ``finally``. The client is
httpx (not the openai package) so the time to first token is read at the first content chunk's arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.measure import Context, NotApplicable, Plot, Result
from impl.serving.testing import read_url, stop_process_group

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
             "Name three colours of the rainbow.", "Why is the sky blue?", "Tell me a short story.",
             "What is two plus two?", "Give me a tip for learning to code."]


# --- processes -----------------------------------------------------------------------------------------
def start(cmd: Sequence[str], pattern: str, timeout_s: float, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` and wait for the URL its stdout announces (``pattern`` with one group; ``read_url`` keeps
    the stdout drained). Stops it and raises with the output seen when it exits or times out first."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        return proc, read_url(proc, timeout_s, re.compile(pattern)).rstrip("/")
    except RuntimeError:
        stop(proc)
        raise


stop = stop_process_group  # SIGTERM the process group (a router's workers too), SIGKILL it after 15 s


def threads(ctx: Context, workers: int = 1) -> str:
    """torch threads per worker: the bench's threads less one (the clients, the router and each worker's
    event loop need a core too), shared among ``workers``, at least 1. On this 2-core machine that is 1:
    two OpenMP threads per worker spinning against the event loop and the clients made a tiny model's decode
    steps 20x slower (measured)."""
    return str(max(1, ((ctx.threads or 1) - 1) // workers))


def api_cmd(model: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "impl.serving", "api", "--model", model, "--port", "0", "--log-level", "warning",
            *args]


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} was not ready after {timeout_s:.0f} s")


def scrape(url: str) -> dict[str, float]:
    """``/metrics`` as {"name{label=value,...}": value} (samples summed over nothing: one line each)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if k.split("{")[0] == name and all(w in k.split("{")[1] for w in want))


def model_choice(quick: bool, tmp: Path) -> tuple[str, str]:
    """(--model argument, what it is). Quick: the tiny chat model (2 layers of 64). Full: the zoo's chat model
    if cached, else bpe-base if cached, else a random model of bpe-base's depth and width (6 layers of 256,
    context 1024) over the tiny model's 326-token BPE: a full-size build is never started from a benchmark."""
    from impl.serving.tiny import save_tiny_chat_model

    if quick:
        return str(save_tiny_chat_model(tmp / "tiny")), "tiny-chat (random weights, 2 layers of 64)"
    import impl.zoo  # noqa: F401  (registers chat)
    from impl import model_cache

    for name in ("chat", "bpe-base"):
        if model_cache.state(name) == "cached":
            return name, name
    path = save_tiny_chat_model(tmp / "base-shaped", n_layer=6, n_embd=256, block_size=1024)
    return str(path), "random weights of bpe-base's depth and width (6 layers of 256) over the tiny 326-token " \
        "BPE: neither chat nor bpe-base is in the model cache"


# --- the client ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one client saw of one request."""

    ok: bool = False
    status: int = 0
    cancelled: bool = False  # the client hung up on purpose
    cut: bool = False  # the stream ended without [DONE] or with an error event
    error: str = ""
    ttft_s: float | None = None
    latency_s: float = 0.0
    tokens: int = 0
    worker: str = ""
    text: list[str] = field(default_factory=list)


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data:`` payloads of an SSE body. Split on bytes, not with ``aiter_lines``: that splits like
    ``str.splitlines``, also on U+0085, U+2028 and U+2029, which a server writing JSON with
    ``ensure_ascii=False`` (ours) may put inside an event when the model emits them."""
    buf = b""
    async for chunk in response.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].rstrip(b"\r").decode()


def model_id(url: str) -> str:
    """The id the server (or router) at ``url`` serves, from /v1/models."""
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


async def chat(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int,
               hang_up_after: int | None = None, api_key: str | None = None, temperature: float = 0.0) -> Outcome:
    """One streamed, greedy chat request with ``ignore_eos`` (exactly ``max_tokens`` tokens unless the
    context ends first); ``hang_up_after`` content chunks closes the stream early (a cancelling client)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = Outcome()
    start = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            out.status, out.worker = r.status_code, r.headers.get("x-upstream-worker", "")
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:200]
                return out
            chunks = 0
            async for data in sse_data(r):
                if data == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    out.error = f"a malformed event: {data[:80]!r}"
                    break
                if "error" in event:
                    out.error = event["error"]["message"]
                    break
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - start
                        out.text.append(piece)
                        chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    out.cancelled = True
                    break
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency_s = time.perf_counter() - start
    out.cut = not done and not out.cancelled
    out.ok = done and not out.error
    return out


async def run_clients(url: str, clients: int, per_client: int, max_tokens: int, deadline_s: float,
                      hang_up_every: int = 0, api_key: str | None = None) -> tuple[list[Outcome], float]:
    """``clients`` concurrent loops, each sending ``per_client`` requests back to back (client c asks
    question c mod 8, then the next); every ``hang_up_every``-th request (0: none) hangs up after 2 chunks.
    Returns the outcomes (one per request sent) and the wall time. Requests not started by ``deadline_s``
    are not sent (counted by the caller as lost if it expected them)."""
    outcomes: list[Outcome] = []
    model = model_id(url)
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s, connect=10), limits=limits) as client:
        async def loop(c: int) -> None:
            for i in range(per_client):
                if time.perf_counter() - start > deadline_s:
                    return
                n = c * per_client + i
                hang = 2 if hang_up_every and n % hang_up_every == hang_up_every - 1 else None
                outcomes.append(await chat(client, url, model, QUESTIONS[(c + i) % len(QUESTIONS)], max_tokens, hang,
                                           api_key))

        await asyncio.gather(*(loop(c) for c in range(clients)))
    return outcomes, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def summary(outcomes: list[Outcome], wall_s: float) -> dict:
    """tokens/s, requests/s, p50/p99 latency and time to first token (client-side, ms) of the ok requests."""
    ok = [o for o in outcomes if o.ok]
    lat = [o.latency_s * 1e3 for o in ok]
    ttft = [o.ttft_s * 1e3 for o in ok if o.ttft_s is not None]
    return {"requests": len(outcomes), "ok": len(ok), "tokens": sum(o.tokens for o in ok),
            "wall_s": round(wall_s, 2), "tokens_per_s": round(sum(o.tokens for o in ok) / wall_s, 1),
            "requests_per_s": round(len(ok) / wall_s, 2),
            "latency_ms_p50": round(percentile(lat, 0.5), 1), "latency_ms_p99": round(percentile(lat, 0.99), 1),
            "ttft_ms_p50": round(percentile(ttft, 0.5), 1), "ttft_ms_p99": round(percentile(ttft, 0.99), 1)}


# --- claim 1: batched throughput -------------------------------------------------------------------------
CLIENTS = 32


def batched_throughput(ctx: Context) -> Result:
    """tokens/s with continuous batching (32 rows) / tokens/s one request at a time, same 32-client load."""
    per_client, max_tokens = (2, 16) if ctx.quick else (4, 64)
    with tempfile.TemporaryDirectory() as tmp:
        model, which = model_choice(ctx.quick, Path(tmp))
        sides: dict[str, dict] = {}
        texts: dict[str, list[str]] = {}
        for name, rows in (("batched", CLIENTS), ("one_at_a_time", 1)):
            cmd = api_cmd(model, "--max-num-seqs", str(rows), "--max-queue", "256", "--threads", threads(ctx))
            proc, url = start(cmd, r"serving on (http://\S+)", 600)
            try:
                wait_ready(url)
                asyncio.run(run_clients(url, 2, 1, 4, 60))  # warm-up: first forwards, first connections
                outcomes, wall = asyncio.run(run_clients(url, CLIENTS, per_client, max_tokens, 1200))
            finally:
                stop(proc)
            bad = [o for o in outcomes if not o.ok]
            if bad:
                raise RuntimeError(f"{len(bad)} of {len(outcomes)} requests failed on the {name} server: "
                                   f"{bad[0].status} {bad[0].error}")
            sides[name] = summary(outcomes, wall)
            texts[name] = sorted("".join(o.text) for o in outcomes)
    expected = CLIENTS * per_client * max_tokens
    for name, s in sides.items():
        if s["tokens"] != expected:
            raise AssertionError(f"the {name} server returned {s['tokens']} tokens, not {expected}: not the same work")
    value = sides["batched"]["tokens_per_s"] / sides["one_at_a_time"]["tokens_per_s"]
    same = sum(a == b for a, b in zip(texts["batched"], texts["one_at_a_time"], strict=True))
    details = {"model": which, "torch_threads_per_worker": threads(ctx), "clients": CLIENTS,
               "requests_per_client": per_client, "max_tokens": max_tokens,
               "identical_answers": f"{same}/{len(texts['batched'])}", **sides}
    keys = ["latency_ms_p50", "latency_ms_p99", "ttft_ms_p50", "ttft_ms_p99"]
    plots = [Plot("32 clients: latency and time to first token (client-side)", keys,
                  {name: [sides[name][k] for k in keys] for name in sides}, ylabel="ms", kind="bar"),
             Plot("32 clients: throughput", ["tokens/s"], {name: [sides[name]["tokens_per_s"]] for name in sides},
                  ylabel="tokens/s", kind="bar")]
    return Result(value=value, unit="x", details=details, plots=plots)


# --- claim 2: the soak ---------------------------------------------------------------------------------
def router_cmd(model: str, workers: int, *api_args: str) -> list[str]:
    return [sys.executable, "-m", "impl.serving", "router", "--port", "0", "--workers", str(workers),
            "--model", model, "--health-interval", "0.25", "--", *api_args]


def workers_of(router_url: str) -> list[dict]:
    return httpx.get(f"{router_url}/router/workers", timeout=5).json()


def wait_workers_ready(router_url: str, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if sum(w["ready"] for w in workers_of(router_url)) == n:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the router at {router_url} did not get {n} ready workers in {timeout_s:.0f} s")


def idle_blocks(urls: Sequence[str], timeout_s: float = 15) -> dict[str, float]:
    """Each worker's KV blocks held, once no request is in flight there (or what it holds at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {}
        for u in urls:
            m = scrape(u)
            held[u] = total(m, "serving_kv_blocks_used") + total(m, "serving_requests_in_flight")
        if not any(held.values()) or time.monotonic() > deadline:
            return {u: total(scrape(u), "serving_kv_blocks_used") for u in urls}
        time.sleep(0.25)


def soak(ctx: Context) -> Result:
    """(failed + lost) / sent in a soak through the router: 16 clients for a fixed time, every 5th request
    hanging up after 2 chunks, worker 0 SIGKILLed early on and restarted by the router's supervisor."""
    clients, duration_s, kill_at_s, max_tokens = (16, 20, 4, 24) if ctx.quick else (16, 90, 20, 48)
    with tempfile.TemporaryDirectory() as tmp:
        model, which = model_choice(ctx.quick, Path(tmp))
        cmd = router_cmd(model, 2, "--max-num-seqs", "16", "--max-queue", "256", "--threads", threads(ctx, 2))
        proc, url = start(cmd, r"routing on (http://\S+)", 60)
        try:
            wait_workers_ready(url, 2)
            kill: dict = {}

            def killer() -> None:
                time.sleep(kill_at_s)
                victim = workers_of(url)[0]
                while victim["outstanding"] == 0:  # strike while it serves: the case the claim is about
                    time.sleep(0.002)
                    victim = workers_of(url)[0]
                kill["in_flight_on_it"] = victim["outstanding"]
                kill["pid"], kill["at"] = victim["pid"], time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)
                while time.monotonic() - kill["at"] < 300:
                    w = workers_of(url)[0]
                    if w["ready"] and w["pid"] != kill["pid"]:
                        kill["restart_s"] = time.monotonic() - kill["at"]
                        kill["back_at"] = time.monotonic()
                        return
                    time.sleep(0.1)

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            sent = {"n": 0}
            model_name = model_id(url)
            outcomes: list[tuple[float, Outcome]] = []

            async def load() -> None:
                start_t = time.monotonic()
                limits = httpx.Limits(max_connections=clients + 4)
                async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits) as client:
                    async def loop(c: int) -> None:
                        i = 0
                        while time.monotonic() - start_t < duration_s:
                            sent["n"] += 1
                            hang = 2 if sent["n"] % 5 == 0 else None
                            question = QUESTIONS[(c + i) % len(QUESTIONS)]
                            temperature = 0.8 if sent["n"] % 2 else 0.0  # half sampled, without a seed
                            o = await chat(client, url, model_name, question, max_tokens, hang,
                                           temperature=temperature)
                            outcomes.append((time.monotonic(), o))
                            i += 1

                    await asyncio.gather(*(loop(c) for c in range(clients)))

            asyncio.run(load())
            thread.join(310)
            blocks = idle_blocks([w["url"] for w in workers_of(url) if w["url"]])
            routed = {w["index"]: w["routed"] for w in workers_of(url)}
            router_metrics = scrape(url)
        finally:
            stop(proc)
    got = [o for _, o in outcomes]
    cancelled = [o for o in got if o.cancelled]
    cut = [o for o in got if not o.ok and not o.cancelled and o.cut and o.status == 200]
    other = [o for o in got if not o.ok and not o.cancelled and o not in cut]
    lost = sent["n"] - len(got)
    after_restart = [o for t, o in outcomes if "back_at" in kill and t > kill["back_at"] and o.worker == "0"]
    failed = len(cut) + len(other)
    details = {"model": which, "clients": clients, "duration_s": duration_s, "max_tokens": max_tokens,
               "sent": sent["n"], "completed": sum(o.ok for o in got), "cancelled_by_client": len(cancelled),
               "failed_cut_mid_stream": len(cut), "failed_other": len(other), "lost": lost,
               "failure_examples": sorted({(o.status, o.error[:120]) for o in other + cut})[:5],
               "killed_worker_pid": kill.get("pid"),
               "requests_in_flight_on_it_at_the_kill": kill.get("in_flight_on_it"),
               "restart_s": round(kill["restart_s"], 2) if "restart_s" in kill else "not restarted",
               "requests_on_restarted_worker": len(after_restart),
               "router_retries": total(router_metrics, "router_retries_total"),
               "router_resumed_streams": total(router_metrics, "router_resumed_streams_total"),
               "routed_per_worker": routed,
               "kv_blocks_held_after": blocks}
    if any(blocks.values()):
        raise AssertionError(f"KV blocks still held after the soak: {blocks}")
    return Result(value=(failed + lost) / sent["n"], unit="", details=details)


# --- claim 3: /metrics against the load --------------------------------------------------------------------
def metrics_agree(ctx: Context) -> Result:
    """Requests counted by the workers' /metrics (summed, 200s of both generation endpoints) over requests
    the clients sent through the router; tokens counted vs received and the deepest queue seen in details."""
    clients, per_client, max_tokens = (16, 2, 48) if ctx.quick else (32, 4, 32)
    with tempfile.TemporaryDirectory() as tmp:
        model, which = model_choice(ctx.quick, Path(tmp))
        cmd = router_cmd(model, 2, "--max-num-seqs", "4", "--max-queue", "256", "--threads", threads(ctx, 2))
        proc, url = start(cmd, r"routing on (http://\S+)", 60)
        try:
            wait_workers_ready(url, 2)
            workers = [w["url"] for w in workers_of(url)]
            before = [scrape(u) for u in workers]
            peak = {"queue": 0.0, "in_flight": 0.0}
            done = threading.Event()

            def poll() -> None:
                while not done.is_set():
                    with contextlib.suppress(httpx.HTTPError):
                        ms = [scrape(u) for u in workers]
                        peak["queue"] = max(peak["queue"], sum(total(m, "serving_queue_depth") for m in ms))
                        peak["in_flight"] = max(peak["in_flight"],
                                                sum(total(m, "serving_requests_in_flight") for m in ms))
                    time.sleep(0.02)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            try:
                outcomes, wall = asyncio.run(run_clients(url, clients, per_client, max_tokens, 600))
                completions = []
                for i in range(4):  # non-streamed /v1/completions too: both endpoints are counted
                    r = httpx.post(f"{url}/v1/completions", json={"model": model_id(url), "prompt": QUESTIONS[i],
                                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, timeout=120)
                    completions.append(r.json()["usage"]["completion_tokens"] if r.status_code == 200 else None)
            finally:
                done.set()
                poller.join(5)
            after = [scrape(u) for u in workers]
        finally:
            stop(proc)
    if not all(o.ok for o in outcomes) or None in completions:
        raise RuntimeError("requests failed under a load with no fault injected: "
                           f"{[o.error for o in outcomes if not o.ok][:3]}")
    sent = len(outcomes) + len(completions)
    received_tokens = sum(o.tokens for o in outcomes) + sum(completions)

    def delta(name: str, **labels: str) -> float:
        return sum(total(a, name, **labels) - total(b, name, **labels) for a, b in zip(after, before, strict=True))

    counted = delta("serving_requests_total", endpoint="/v1/chat/completions", status="200") + \
        delta("serving_requests_total", endpoint="/v1/completions", status="200")
    counted_tokens = delta("serving_completion_tokens_total")
    details = {"model": which, "requests_sent": sent, "requests_counted": counted,
               "tokens_received": received_tokens, "tokens_counted": counted_tokens,
               "tokens_ratio": round(counted_tokens / received_tokens, 4),
               "generated_tokens_counted": delta("serving_generated_tokens_total"),
               "queue_depth_peak_seen": peak["queue"], "in_flight_peak_seen": peak["in_flight"],
               "load": f"{clients} clients x {per_client} streamed chats + 4 completions, {max_tokens} tokens each",
               "wall_s": round(wall, 2)}
    return Result(value=counted / sent, unit="", details=details)


# --- claim 4: the peer race against llama.cpp's server --------------------------------------------------------
async def complete(client: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    """One streamed /v1/completions request; ok when it ends with [DONE] after a ``length`` finish."""
    out = Outcome()
    start = time.perf_counter()
    finish = None
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:200]
                return out
            async for data in sse_data(r):
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        if out.ttft_s is None:
                            out.ttft_s = time.perf_counter() - start
                        out.text.append(choice["text"])
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency_s = time.perf_counter() - start
    out.ok = done and finish == "length" and not out.error
    out.tokens = body["max_tokens"] if out.ok else 0
    if done and finish != "length":
        out.error = f"finished with {finish!r} before max_tokens: not the same work"
    return out


async def race_clients(url: str, bodies: list[dict], clients: int,
                       per_client: int) -> tuple[list[tuple[int, Outcome]], float]:
    """``clients`` loops sending ``per_client`` completions back to back (client c starts at body c); each
    outcome with the index of its body."""
    outcomes: list[tuple[int, Outcome]] = []
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800, connect=10),
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def loop(c: int) -> None:
            for i in range(per_client):
                k = (c + i) % len(bodies)
                outcomes.append((k, await complete(client, url, bodies[k])))

        await asyncio.gather(*(loop(c) for c in range(clients)))
    return outcomes, time.perf_counter() - start


def llama_cpp_race(ctx: Context) -> Result:
    """Our server's tokens/s (continuous batching, 32 rows) over llama.cpp's server's (llama-cpp-python, which
    serves one request at a time) on the same weights, prompts and 32-client load."""
    from reference.llama_cpp_server import export, free_port, llama_python, server_cmd

    python = llama_python()
    if python is None:
        raise NotApplicable("llama-cpp-python[server] (0.3.36, which compiles llama.cpp) and gguf are not "
                            "installed: not in this venv nor at $HANDSON_LLAMA_CPP_PYTHON (pip install -e '.[llama]', "
                            "a ~13 min compile)")
    from impl.sft.templates import render_chat

    per_client, max_tokens = (2, 16) if ctx.quick else (2, 64)
    n = threads(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        model, which = model_choice(ctx.quick, Path(tmp))
        npz, meta = export(model, Path(tmp) / "gguf")
        info = json.loads(meta.read_text())
        gguf_path = Path(tmp) / "model.gguf"
        convert = subprocess.run([python, str(Path(__file__).parents[2] / "reference" / "llama_cpp_server.py"),
                                  str(npz), str(meta), str(gguf_path)], capture_output=True, text=True)
        if convert.returncode != 0:
            raise NotApplicable(f"our weights do not convert to GGUF: {convert.stderr.strip().splitlines()[-1]}")
        prompts = [render_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
        sides: dict[str, dict] = {}
        texts: dict[str, list[str]] = {}
        for name in ("ours", "llama.cpp"):
            if name == "ours":
                cmd, pattern = api_cmd(model, "--max-num-seqs", str(CLIENTS), "--threads", n), r"serving on (http://\S+)"
                extra = {"ignore_eos": True}
            else:
                port = free_port()
                cmd = server_cmd(python, gguf_path, port, int(n), info["n_ctx"], "peer") + \
                    ["--interrupt_requests", "False"]  # else each new request cuts the one streaming
                pattern = rf"Uvicorn running on (http://127\.0\.0\.1:{port})"
                extra = {"logit_bias": {str(info["end_id"]): -100.0}}  # no early end: the same tokens count
            proc, url = start(cmd, pattern, 300)
            try:
                if name == "ours":
                    wait_ready(url)  # it announces its port before the model is loaded
                name_id = model_id(url)
                bodies = [{"model": name_id, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, **extra} for p in prompts]
                asyncio.run(race_clients(url, bodies, 2, 1))  # warm-up
                indexed, wall = asyncio.run(race_clients(url, bodies, CLIENTS, per_client))
            finally:
                stop(proc)
            outcomes = [o for _, o in indexed]
            bad = [o for o in outcomes if not o.ok]
            if bad:
                raise RuntimeError(f"{len(bad)} of {len(outcomes)} requests failed on {name}: {bad[0].status} "
                                   f"{bad[0].error}")
            sides[name] = summary(outcomes, wall)
            texts[name] = {k: "".join(o.text) for k, o in indexed}  # greedy: one answer per prompt
    if sides["ours"]["tokens"] != sides["llama.cpp"]["tokens"]:
        raise AssertionError(f"different work: {sides['ours']['tokens']} vs {sides['llama.cpp']['tokens']} tokens")
    same = sum(texts["ours"][k] == texts["llama.cpp"][k] for k in texts["ours"])
    details = {"model": which, "torch_and_llama_threads": n, "clients": CLIENTS, "requests_per_client": per_client,
               "max_tokens": max_tokens, "ours": sides["ours"], "llama.cpp": sides["llama.cpp"],
               "identical_greedy_answers": f"{same}/{len(texts['ours'])} prompts (ours may pick <|end|> and go on "
                                           "where llama.cpp, with <|end|> banned, takes the next token)",
               "llama_cpp_python": "0.3.36 (its server serves one request at a time)"}
    keys = ["latency_ms_p50", "latency_ms_p99", "ttft_ms_p50", "ttft_ms_p99"]
    plots = [Plot("Ours vs llama.cpp's server, 32 clients: latency and time to first token", keys,
                  {name: [sides[name][k] for k in keys] for name in sides}, ylabel="ms", kind="bar")]
    return Result(value=sides["ours"]["tokens_per_s"] / sides["llama.cpp"]["tokens_per_s"], unit="x",
                  details=details, plots=plots)
