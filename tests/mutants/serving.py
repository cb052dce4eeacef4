"""Mutants of the server (project 28): each breaks one thing the spec's checks must notice. Server mutants
run on their own server (a real uvicorn on loopback, in a thread) built with the broken part."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from impl.serving import app as app_module
from impl.serving import runs
from impl.serving.async_engine import AsyncEngine
from impl.serving.detokenize import IncrementalDetokenizer


class _PerTokenDecode(IncrementalDetokenizer):
    """Decodes each step's bytes on their own: a UTF-8 character split across steps becomes U+FFFD."""

    def add(self, ids):
        if self.stopped:
            return ""
        data = b"".join(self.tokenizer.token_bytes(i) for i in ids if i not in self.skip_ids)
        self._pending += data.decode("utf-8", errors="replace")
        return self._release(final=False)


class _NoHoldBack(IncrementalDetokenizer):
    """Emits text as soon as it is decoded: a stop string split across steps is never seen whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hold = 0

    def _release(self, final):
        out = super()._release(final)
        self._pending = ""
        return out


class _KeepsStopString(IncrementalDetokenizer):
    """Ends at a stop string but cuts after it, leaving it in the text."""

    def _release(self, final):
        found = [(i, s) for i, s in ((self._pending.find(s), s) for s in self.stop) if i >= 0]
        if not found:
            return super()._release(final)
        i, s = min(found)
        out, self._pending, self.stopped = self._pending[: i + len(s)], "", True
        self.text += out
        return out


def per_token_decode(**case):
    return runs.detokenize_incremental(**case, detokenizer=_PerTokenDecode)


def no_stop_hold_back(**case):
    return runs.detokenize_incremental(**case, detokenizer=_NoHoldBack)


def stop_string_left_in_text(**case):
    """The server with a detokenizer that keeps the stop string (non-streamed answer)."""
    url = runs.server_url("keeps-stop", detokenizer=_KeepsStopString)
    return runs._ask(url, case["prompt"], case["max_tokens"], case["stop"], case["chat"])


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


async def _events_without_last_chunk(*args, **kwargs):
    held = None
    async for chunk in _real_events(*args, **kwargs):
        if chunk.startswith(b"data: [DONE]"):
            yield chunk
        elif held is None:
            held = chunk
        else:
            yield held
            held = chunk
    # the last chunk before [DONE] (the one carrying the final text and finish reason) is lost


_real_events = app_module._events


def stream_drops_last_chunk(**case):
    """The server's SSE stream loses its last chunk before ``[DONE]``."""
    with _patched(app_module, "_events", _events_without_last_chunk):
        return runs.server_stream(**case)


def disconnect_not_aborted(**case):
    """The engine is never told to abort: a client that hangs up keeps its request generating."""
    url = runs.server_url("no-abort")
    with _patched(AsyncEngine, "abort", lambda self, request_id: None):
        return runs.disconnect_mid_stream(**case, url=url)
