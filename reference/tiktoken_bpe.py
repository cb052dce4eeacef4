"""tiktoken (OpenAI's Rust BPE) loaded with *our* merges: the oracle for encode and decode.

tiktoken ranks byte strings, not pairs: ``mergeable_ranks[bytes(token)] = id``. Our ids are
ranks already (byte b is id b, merge i is id 256 + i), so the table is each token's bytes.
The bytes are rebuilt here from the merge list rather than imported from ``impl`` so that the
oracle shares no code with what it checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import tiktoken


def _token_bytes(merges: Sequence[Sequence[int]]) -> list[bytes]:
    table = [bytes([i]) for i in range(256)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return table


@lru_cache(maxsize=8)
def _encoding(merges: tuple[tuple[int, int], ...], pattern: str, special_tokens: tuple[str, ...]) -> tiktoken.Encoding:
    table = _token_bytes(merges)
    ranks = {token: rank for rank, token in enumerate(table)}
    if len(ranks) != len(table):
        raise ValueError(
            "these merges create two tokens with the same bytes; tiktoken ranks byte strings, "
            "so it cannot represent this vocabulary"
        )
    specials = {token: len(table) + i for i, token in enumerate(special_tokens)}
    return tiktoken.Encoding("handson-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def encoding(merges: Sequence[Sequence[int]], pattern: str, special_tokens: Sequence[str] = ()) -> tiktoken.Encoding:
    """A ``tiktoken.Encoding`` with our merges, split pattern (a regex) and special tokens."""
    key = tuple((int(a), int(b)) for a, b in merges)
    return _encoding(key, pattern, tuple(special_tokens))


def _allowed(allowed_special: str | Sequence[str]) -> tuple[object, object]:
    # our vocabulary of options mapped onto tiktoken's (allowed_special, disallowed_special)
    if allowed_special == "none_raise":
        return set(), "all"
    if allowed_special == "none":
        return set(), ()
    if allowed_special == "all":
        return "all", "all"
    return set(allowed_special), "all"


def encode_ids(
    text: str,
    merges: Sequence[Sequence[int]],
    pattern: str,
    special_tokens: Sequence[str] = (),
    allowed_special: str | Sequence[str] = "none_raise",
) -> list[int]:
    """tiktoken's ids for ``text`` under our merges (raises ValueError on a refused special token).

    ``pattern`` is the split regex itself (tiktoken knows no pattern names).
    """
    allowed, disallowed = _allowed(allowed_special)
    return encoding(merges, pattern, special_tokens).encode(
        text, allowed_special=allowed, disallowed_special=disallowed
    )


def decode_ids(ids: Sequence[int], merges: Sequence[Sequence[int]], special_tokens: Sequence[str] = ()) -> str:
    """tiktoken's text for ``ids`` (invalid UTF-8 becomes U+FFFD); the split pattern plays no part."""
    return encoding(merges, r"\S+|\s+", special_tokens).decode(list(ids), errors="replace")
