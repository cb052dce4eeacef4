"""The callables spec 28's checks compare: one request answered by the engine offline and by a real server.

Every function takes one case: ``prompt`` (text), ``max_tokens``, ``stop`` (stop strings), ``chat`` (send the
prompt as one user message to /v1/chat/completions instead of /v1/completions), and returns
``(text, finish_reason)``, greedy. ``engine_direct`` is the truth: the engine run offline, its ids decoded in
one go by the tokenizer and cut at the first stop string with ``str.find``, sharing no code with the server's
streaming detokenizer. ``server_stream`` / ``server_nonstream`` ask a real uvicorn server on loopback (started
once per process in a thread, on the tiny chat model of ``impl.serving.tiny`` with a 1,024-token context, on
the CPU like ``engine_direct``).
``disconnect_mid_stream`` reads two chunks of a long stream, hangs up, and reports what the engine did after.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import httpx

from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.serving.app import ServerConfig, create_app
from impl.serving.testing import serving_in_thread

MODEL_ID = "tiny-chat"
CONTEXT = 1024


@cache
def tiny_model_dir() -> Path:
    """The tiny chat model saved once per process (a temp directory removed at exit)."""
    from impl.serving.tiny import save_tiny_chat_model

    root = tempfile.TemporaryDirectory(prefix="serving-runs-")
    atexit.register(root.cleanup)
    return save_tiny_chat_model(Path(root.name) / MODEL_ID, block_size=CONTEXT)


@cache
def tiny_model():
    from impl.zoo import load_dir

    model, tokenizer, _ = load_dir(tiny_model_dir())
    return model, tokenizer


_servers: dict[str, str] = {}
_lock = threading.Lock()


def server_url(variant: str = "real", **app_seams) -> str:
    """The base URL of this process's server ``variant`` (started on first use, stopped at exit)."""
    with _lock:
        if variant not in _servers:
            app = create_app(ServerConfig(model=str(tiny_model_dir()), max_num_seqs=4, device="cpu"), **app_seams)
            stack = contextlib.ExitStack()
            _servers[variant] = stack.enter_context(serving_in_thread(app))
            atexit.register(stack.close)
        return _servers[variant]


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    from impl.sft.templates import render_chat

    text = render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
    return tokenizer.encode(text, allowed_special="all")


def engine_direct(prompt: str, max_tokens: int, stop: Sequence[str] = (), chat: bool = False,
                  **_ignored) -> tuple[str, str]:
    """The engine offline on the same model and prompt; the ids decoded at once, cut at the first stop string."""
    from impl.sft.evaluate import stop_ids

    model, tokenizer = tiny_model()
    ends = stop_ids(tokenizer)
    out = Engine(model).generate([_prompt_ids(tokenizer, prompt, chat)],
                                 SamplingParams(max_tokens=max_tokens, stop_ids=tuple(ends)))[0]
    text = tokenizer.decode([t for t in out.token_ids if t not in ends])
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, out.finish_reason


def _body(prompt: str, max_tokens: int, stop: Sequence[str], chat: bool, stream: bool) -> tuple[str, dict]:
    body = {"model": MODEL_ID, "max_tokens": max_tokens, "temperature": 0, "stop": list(stop), "stream": stream}
    if chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", body | {"prompt": prompt}


def _ask(url: str, prompt: str, max_tokens: int, stop: Sequence[str], chat: bool) -> tuple[str, str]:
    path, body = _body(prompt, max_tokens, stop, chat, stream=False)
    r = httpx.post(url + path, json=body, timeout=60)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]


def sse_events(response: httpx.Response):
    """The JSON payloads of an SSE response, up to ``data: [DONE]`` (a stream without it raises)."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)
    raise AssertionError("the stream ended without data: [DONE]")


def _ask_streaming(url: str, prompt: str, max_tokens: int, stop: Sequence[str], chat: bool) -> tuple[str, str]:
    path, body = _body(prompt, max_tokens, stop, chat, stream=True)
    parts, reason = [], None
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        r.raise_for_status()
        for event in sse_events(r):
            for choice in event.get("choices", []):
                parts.append((choice["delta"].get("content") or "") if chat else choice["text"])
                reason = choice["finish_reason"] or reason
    return "".join(parts), reason


def server_nonstream(prompt: str, max_tokens: int, stop: Sequence[str] = (), chat: bool = False,
                     **_ignored) -> tuple[str, str]:
    """The answer of the real server, one JSON response."""
    return _ask(server_url(), prompt, max_tokens, stop, chat)


def server_stream(prompt: str, max_tokens: int, stop: Sequence[str] = (), chat: bool = False,
                  **_ignored) -> tuple[str, str]:
    """The answer of the real server streamed (SSE), its pieces concatenated."""
    return _ask_streaming(server_url(), prompt, max_tokens, stop, chat)


_METRIC = re.compile(r'^(serving_\w+)\{model="[^"]*"\} (\S+)$', re.M)


def engine_gauges(url: str) -> dict[str, float]:
    """The engine-side series of ``/metrics`` (KV blocks, generated tokens, queue), by name."""
    return {name: float(v) for name, v in _METRIC.findall(httpx.get(url + "/metrics", timeout=10).text)}


def wait_idle(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """Poll ``/metrics`` until the engine has no running or waiting request (or ``timeout_s`` passed); the
    engine gauges then."""
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = engine_gauges(url)
        idle = gauges["serving_running_requests"] == 0 and gauges["serving_queue_depth"] == 0
        if idle or time.monotonic() > deadline:
            return gauges
        time.sleep(0.02)


def disconnect_mid_stream(prompt: str, max_tokens: int, url: str | None = None, chunks: int = 2,
                          settle_s: float = 10.0, headers: dict[str, str] | None = None,
                          **_ignored) -> dict[str, float]:
    """Stream a request that ignores the end token, hang up after ``chunks`` chunks, then wait (up to
    ``settle_s``) until the engine holds no request. Returns the tokens the engine generated for it, its
    ``max_tokens``, and the KV blocks free / total afterwards."""
    url = url or server_url()
    before = engine_gauges(url)
    model = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    path, body = _body(prompt, max_tokens, (), False, stream=True)
    body = body | {"ignore_eos": True, "model": model}
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=60) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        seen = 0
        while seen < chunks:
            seen += next(lines).startswith("data: ")
    after = wait_idle(url, settle_s)
    return {"generated": after["serving_generated_tokens_total"] - before["serving_generated_tokens_total"],
            "max_tokens": max_tokens, "free": after["serving_kv_blocks_free"],
            "total": after["serving_kv_blocks_total"]}


def detokenize_one_shot(ids: Sequence[int], chunks: Sequence[int], stop: Sequence[str] = (),
                        **_ignored) -> str:
    """The truth for streaming detokenization: all ids decoded at once, cut at the first stop string."""
    text = tiny_model()[1].decode(list(ids))
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def detokenize_incremental(ids: Sequence[int], chunks: Sequence[int], stop: Sequence[str] = (),
                           detokenizer: type | None = None, **_ignored) -> str:
    """The server's streaming detokenizer fed ``chunks`` ids at a time, its pieces joined."""
    from impl.serving.detokenize import IncrementalDetokenizer

    detok = (detokenizer or IncrementalDetokenizer)(tiny_model()[1], stop)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(detok.add(ids[start:start + n]))
        start += n
    pieces.append(detok.add(ids[start:]))
    pieces.append(detok.finish())
    return "".join(pieces)
