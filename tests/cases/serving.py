"""Cases for project 28: requests to the real server (prompt, max_tokens, stop strings, chat or not), streams
to hang up on, and id sequences for the streaming detokenizer (multi-byte UTF-8 split across chunks).

Server cases stay few and short: every example is a real HTTP request (and an offline engine run)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from harness.cases import Cases

# Pieces the tiny model's greedy noise often contains (it repeats: "MMwwww555555555nenene...", " no no<<<<"):
# single characters cut early, longer ones exercise the hold-back across steps
STOPS = ["e", "5", "M", "ne", " no", "<<", "qqq", " c", "w5", "zz"]


def request(prompt: str, max_tokens: int, stop: list[str] | None = None, chat: bool = False,
            id: str | None = None) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "stop": stop or [], "chat": chat} | ({"id": id} if id else {})


requests = Cases(
    edge=[
        request("Hello", 1, id="one-token"),
        request("Hello", 40, id="completion"),
        request("Hi there", 40, chat=True, id="chat"),
        request("Hello", 60, ["55"], id="two-char-stop"),
        request("Hi there", 60, ["<<<", " no<"], chat=True, id="chat-stops-earliest-wins"),
        request("To be, or not to be", 60, ["qq", "zzz-never"], id="stop-and-absent-stop"),
        request("What is the capital of France? ü ☃", 48, chat=True, id="non-ascii-prompt"),
    ],
    strategy=st.builds(
        request,
        prompt=st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="<>|"),
                       min_size=1, max_size=40),
        max_tokens=st.integers(1, 64),
        stop=st.lists(st.sampled_from(STOPS), max_size=3, unique=True),
        chat=st.booleans(),
    ),
)


def stream_case(prompt: str, max_tokens: int, chunks: int = 2, id: str | None = None) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "chunks": chunks} | ({"id": id} if id else {})


disconnects = Cases(
    edge=[
        stream_case("Hello", 900, 2, id="after-two-chunks"),
        stream_case("To be, or not to be", 900, 1, id="after-the-first-chunk"),
    ],
    strategy=st.builds(stream_case, prompt=st.sampled_from(["Hello", "Paris.", "How are you today?"]),
                       max_tokens=st.integers(800, 1000), chunks=st.integers(1, 4)),
)


def _ids(text: str) -> list[int]:
    """``text`` as byte-level ids (one id per byte: every multi-byte character is split across ids)."""
    return list(text.encode())


def detok_case(text: str, chunks: list[int], stop: list[str] | None = None, merged: bool = False,
               raw: list[int] | None = None, id: str | None = None) -> dict[str, Any]:
    """Ids of ``text`` (bytes, or the tiny BPE's ids when ``merged``; ``raw``: these byte ids, valid UTF-8
    or not) fed ``chunks`` at a time."""
    if raw is not None:
        ids = list(raw)
    elif merged:
        from impl.serving.runs import tiny_model

        ids = tiny_model()[1].encode(text, allowed_special="none")
    else:
        ids = _ids(text)
    return {"ids": ids, "chunks": chunks, "stop": stop or []} | ({"id": id} if id else {})


detokenization = Cases(
    edge=[
        detok_case("héllo wörld", [1] * 20, id="two-byte-chars-one-byte-at-a-time"),
        detok_case("snow ☃ and 🎉!", [1, 2, 3, 1, 1, 5, 2, 1, 1, 1], id="three-and-four-byte-chars"),
        detok_case("", [1, 2, 1], raw=[97, 0xFF, 98, 0xE2, 0x98], id="invalid-byte-and-truncated-tail"),
        detok_case("the answer is: 42", [3, 3, 3, 3], [": 4"], id="stop-split-across-chunks"),
        detok_case("Hello! How are you today?", [2, 1, 4], ["are"], merged=True, id="bpe-ids-stop"),
        detok_case("🎉🎉", [3, 5], id="emoji-split-3-1"),
    ],
    strategy=st.builds(
        detok_case,
        text=st.text(st.characters(max_codepoint=0x1F64F, exclude_categories=("Cs",)), max_size=24),
        chunks=st.lists(st.integers(1, 4), max_size=30),
        stop=st.lists(st.sampled_from(["a", "é", "☃x", "ab", "🎉"]), max_size=2),
        merged=st.booleans(),
    ),
)


def disconnect_frees_and_stops(fn, **case) -> None:
    """A client that hangs up mid-stream: the engine stops generating for it (fewer tokens than it asked
    for, long before the end) and every KV block is back in the pool."""
    got = fn(**case)
    assert got["free"] == got["total"], f"{got['total'] - got['free']} KV blocks still held after the disconnect"
    assert got["generated"] < got["max_tokens"], (
        f"the engine generated all {got['generated']} tokens for a client that had hung up")
