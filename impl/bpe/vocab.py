"""The id layout every tokenizer here shares.

ids 0..255 are the raw bytes; merge ``i`` (0-based, in training order) creates id ``256 + i``
and its rank is that id (a lower id merges first); special tokens come after the merges, in
the order they were registered. ``vocab_size`` counts all three.
"""

from __future__ import annotations

from collections.abc import Sequence

N_BYTES = 256
Pair = tuple[int, int]


def num_merges(vocab_size: int, n_special: int = 0) -> int:
    """How many merges a vocabulary of ``vocab_size`` ids holds beside bytes and special tokens."""
    smallest = N_BYTES + n_special
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be at least {smallest} (256 byte tokens + {n_special} special tokens), got {vocab_size}"
        )
    return vocab_size - smallest


def as_pairs(merges: Sequence[Sequence[int]]) -> list[Pair]:
    """Merges as a list of (a, b) tuples, checking each refers only to ids that exist before it."""
    pairs = []
    for i, merge in enumerate(merges):
        a, b = (int(x) for x in merge)
        if not (0 <= a < N_BYTES + i and 0 <= b < N_BYTES + i):
            raise ValueError(f"merge {i} = ({a}, {b}) refers to an id not created before it (< {N_BYTES + i})")
        pairs.append((a, b))
    return pairs


def special_token_ids(n_merges: int, special_tokens: Sequence[str]) -> dict[str, int]:
    """Special token -> id, numbered after the bytes and the merges in registration order."""
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens must be distinct, got {list(special_tokens)}")
    if any(not token for token in special_tokens):
        raise ValueError("a special token must be a non-empty string")
    return {token: N_BYTES + n_merges + i for i, token in enumerate(special_tokens)}


def token_bytes(merges: Sequence[Pair]) -> list[bytes]:
    """The bytes of every non-special id, built bottom-up: id -> bytes (length 256 + merges)."""
    table = [bytes([i]) for i in range(N_BYTES)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return table
