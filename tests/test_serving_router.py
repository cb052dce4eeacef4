"""The load balancer (impl/serving/router.py) and the one command (up.py), with real processes on loopback.

One router supervising two tiny-model workers serves the module (started once: a few seconds); a second,
smaller set-up checks the ``--worker URL`` mode, the Authorization header passing through and a worker that
is down from the start. Each test leaves both supervised workers ready, so the order does not matter.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from benchmarks.workloads.serving import scrape, start, stop, total, wait_ready, wait_workers_ready, workers_of
from impl.serving.router import parse_args
from impl.serving.tiny import save_tiny_chat_model

WORKER_ARGS = ["--threads", "1", "--max-num-seqs", "8"]
LONG = {"max_tokens": 1500, "temperature": 0, "ignore_eos": True}  # seconds of work: still running meanwhile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny_chat_model(tmp_path_factory.mktemp("serving") / "tiny", block_size=2048))


@pytest.fixture(scope="module")
def router(tiny):
    proc, url = start([sys.executable, "-m", "impl.serving", "router", "--port", "0", "--workers", "2", "--model",
                       tiny, "--health-interval", "0.2", "--", *WORKER_ARGS], r"routing on (http://\S+)", 60)
    try:
        wait_workers_ready(url, 2, 120)
        yield url
    finally:
        stop(proc)


@pytest.fixture
def both_ready(router):
    wait_workers_ready(router, 2, 120)
    return router


def sse_lines(response: httpx.Response):
    """The body's lines split on newline bytes only (``iter_lines`` also splits on U+2028 and U+0085, which
    the server's JSON may carry unescaped)."""
    buf = b""
    for chunk in response.iter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from (line.decode() for line in lines)


def chat_body(content: str = "Hello! How are you today?", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 8, **extra}


def test_requests_spread_over_both_workers(both_ready):
    before = {w["index"]: w["routed"] for w in workers_of(both_ready)}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{both_ready}/v1/chat/completions", json=chat_body())
                                          for _ in range(8)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.headers["x-upstream-worker"] for r in responses} == {"0", "1"}
    after = {w["index"]: w["routed"] for w in workers_of(both_ready)}
    assert all(after[i] > before[i] for i in (0, 1)), (before, after)
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1  # greedy: one answer


def test_least_outstanding_sends_new_requests_to_the_idle_worker(both_ready):
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{both_ready}/v1/chat/completions", json=chat_body(stream=True, **LONG)) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator closes the connection (the request aborts)
            next(lines)  # the long request is running on one worker
            busy_worker = busy.headers["x-upstream-worker"]
            # round robin would alternate; least-outstanding sends every short request to the idle worker
            chosen = [client.post(f"{both_ready}/v1/chat/completions", json=chat_body()).headers["x-upstream-worker"]
                      for _ in range(3)]
            still_busy = {w["index"]: w["outstanding"] for w in workers_of(both_ready)}[int(busy_worker)]
        assert still_busy == 1  # so it was busy all along
        assert chosen == [str(1 - int(busy_worker))] * 3
    outstanding = {w["index"]: w["outstanding"] for w in workers_of(both_ready)}
    assert outstanding == {0: 0, 1: 0}


def test_streaming_passes_through_chunk_by_chunk_and_equals_the_whole_answer(both_ready):
    client = openai.OpenAI(base_url=f"{both_ready}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    knobs = dict(model="tiny", messages=messages, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**knobs)
    pieces = [chunk.choices[0].delta.content for chunk in client.chat.completions.create(**knobs, stream=True)
              if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 24
    assert len(pieces) > 12  # passed on piece by piece, not buffered into one body by the proxy
    models = client.models.list()
    assert len(models.data) == 1  # the workers' lists merged


def test_client_disconnect_through_the_router_frees_the_workers_blocks(both_ready):
    workers = [w["url"] for w in workers_of(both_ready)]
    aborted = sum(total(scrape(u), "serving_aborted_requests_total") for u in workers)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{both_ready}/v1/chat/completions", json=chat_body(stream=True, **LONG)) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
            held = sum(total(scrape(u), "serving_kv_blocks_used") for u in workers)
            assert held > 0  # the request holds blocks while it streams
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = [scrape(u) for u in workers]
        if sum(total(m, "serving_kv_blocks_used") for m in metrics) == 0:
            break
        time.sleep(0.1)
    assert sum(total(m, "serving_kv_blocks_used") for m in metrics) == 0
    assert sum(total(m, "serving_aborted_requests_total") for m in metrics) == aborted + 1


def test_a_killed_worker_is_ejected_requests_still_succeed_and_it_is_restarted(both_ready):
    victim = workers_of(both_ready)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    with httpx.Client(timeout=60) as client:  # right away: before the health loop has noticed
        statuses = [client.post(f"{both_ready}/v1/chat/completions", json=chat_body()).status_code
                    for _ in range(6)]
    assert statuses == [200] * 6
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        w = workers_of(both_ready)[0]
        if w["ready"] and w["pid"] != victim["pid"]:
            break
        time.sleep(0.2)
    assert w["ready"] and w["pid"] != victim["pid"] and w["restarts"] >= 1 and w["url"] != victim["url"]
    metrics = scrape(both_ready)
    assert total(metrics, "router_worker_restarts_total", worker="0") >= 1
    assert total(metrics, "router_ejections_total", worker="0") >= 1
    r = httpx.post(f"{both_ready}/v1/chat/completions", json=chat_body(), timeout=60)
    assert r.status_code == 200


def free_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_worker_urls_mode_forwards_the_api_key_and_skips_a_worker_that_is_down(tiny):
    worker, worker_url = start([sys.executable, "-m", "impl.serving", "api", "--model", tiny, "--port", "0",
                                "--api-key", "sekret", *WORKER_ARGS], r"serving on (http://\S+)", 60)
    router = None
    try:
        wait_ready(worker_url, 60)
        router, url = start([sys.executable, "-m", "impl.serving", "router", "--port", "0", "--worker", free_url(),
                             "--worker", worker_url, "--health-interval", "0.2"], r"routing on (http://\S+)", 60)
        wait_ready(url, 30)
        assert httpx.get(f"{url}/ready").json() == {"ready_workers": 1, "workers": 2}
        denied = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=30)
        assert denied.status_code == 401 and "error" in denied.json()
        key = {"Authorization": "Bearer sekret"}
        for _ in range(3):
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), headers=key, timeout=30)
            assert r.status_code == 200 and r.headers["x-upstream-worker"] == "1"
        assert httpx.get(f"{url}/v1/models", headers=key).json()["data"][0]["id"] == "tiny"
        assert httpx.get(f"{url}/v1/models").status_code == 401
    finally:
        stop(worker)
        if router is not None:
            deadline = time.monotonic() + 10  # the only live worker is gone: the router answers 503
            while time.monotonic() < deadline and httpx.get(f"{url}/ready").status_code != 503:
                time.sleep(0.1)
            r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=30)
            stop(router)
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_ready_worker"


@pytest.mark.parametrize("argv, message", [
    ([], "no workers"),
    (["--worker", "http://127.0.0.1:1", "--workers", "2"], "not both"),
    (["--workers", "2"], "needs --model"),
    (["--worker", "localhost:8000"], "is not a base URL"),
])
def test_router_cli_refuses_bad_arguments_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv, "router")
    assert message in capsys.readouterr().err


def test_up_starts_everything_with_one_command_and_sigterm_stops_it_all(tiny):
    proc, api = start([sys.executable, "-m", "impl.serving", "up", "--model", tiny, "--workers", "1", "--port", "0",
                       "--no-ui", "--", *WORKER_ARGS], r"up: API ready at (http://\S+)/v1", 120)
    try:
        assert httpx.post(f"{api}/v1/chat/completions", json=chat_body(), timeout=30).status_code == 200
        group = subprocess.run(["pgrep", "-g", str(os.getpgid(proc.pid))], capture_output=True, text=True)
        children = [int(p) for p in group.stdout.split() if int(p) != proc.pid]
        assert len(children) >= 2  # the router and its worker
        proc.send_signal(signal.SIGTERM)  # to `up` alone: it must stop its children itself
        assert proc.wait(30) == 0
    finally:
        stop(proc)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in children):
        time.sleep(0.1)
    assert not [p for p in children if alive(p)]


def test_a_worker_that_never_starts_makes_the_router_exit_with_the_reason(tmp_path):
    bad = [sys.executable, "-m", "impl.serving", "router", "--port", "0", "--workers", "1", "--model",
           str(tmp_path / "no-such-model"), "--", *WORKER_ARGS]
    done = subprocess.run(bad, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert done.returncode == 1
    assert "worker 0 never got ready in 2 tries" in done.stderr


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8}], ids=["greedy", "sampled-no-seed"])
def test_a_stream_whose_worker_dies_mid_response_is_resumed_on_the_other_worker(both_ready, sampling):
    body = chat_body("Tell me a short story.", stream=True, **{**LONG, **sampling},
                     stream_options={"include_usage": True})
    pieces, usage, errors, done = [], None, [], False
    resumed = total(scrape(both_ready), "router_resumed_streams_total")
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{both_ready}/v1/chat/completions", json=body) as r:
            victim = next(w for w in workers_of(both_ready) if str(w["index"]) == r.headers["x-upstream-worker"])
            for n, line in enumerate(sse_lines(r)):
                if n == 4:  # early: the worker is still generating (about 1 ms a token), not just sending
                    os.kill(victim["pid"], signal.SIGKILL)
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                errors += [chunk["error"]] if "error" in chunk else []
                usage = chunk.get("usage") or usage
                pieces += [c["delta"].get("content") or "" for c in chunk.get("choices") or []]
    assert done and not errors
    assert usage["completion_tokens"] == LONG["max_tokens"]
    assert total(scrape(both_ready), "router_resumed_streams_total") == resumed + 1
    if sampling["temperature"] == 0:  # greedy: the spliced stream is exactly the uninterrupted answer
        whole = httpx.post(f"{both_ready}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
        assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    wait_workers_ready(both_ready, 2, 120)
