"""Byte-level BPE as the textbook tells it (Sennrich et al. 2016; minbpe's RegexTokenizer).

Training: split the text into chunks, start from their UTF-8 bytes, then repeat: count every
adjacent pair in every chunk, merge the most frequent pair everywhere into a new id.
Encoding: within each chunk, repeatedly merge the adjacent pair that was learned first.
Decoding: expand each id back through the merge tree to bytes, then UTF-8 decode the lot.

Tie-break (both trainers): the highest count wins; among equal counts the smallest pair
(a, b) in id order wins. With it "aaabdaaabac" learns aa -> Z, ab -> Y, ZY -> X, the
textbook (Wikipedia) result.

Every public function has the call shape ``fn(**case)`` the spec's checks use.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from impl.bpe.regex_split import GPT4_SPLIT_PATTERN, AllowedSpecial, segments, split_chunks, training_chunks
from impl.bpe.vocab import N_BYTES, Pair, as_pairs, num_merges, special_token_ids


def get_stats(ids: Sequence[int], counts: dict[Pair, int] | None = None) -> dict[Pair, int]:
    """Counts of each adjacent pair in ``ids`` (overlaps count: "aaa" has (a, a) twice)."""
    counts = {} if counts is None else counts
    for pair in pairwise(ids):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """``ids`` with every occurrence of ``pair`` replaced by ``new_id``, scanning left to right.

    Left to right matters for overlaps: (a, a) in "aaa" becomes [aa, a], never [a, aa].
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def best_pair(counts: dict[Pair, int]) -> Pair:
    """The pair to merge next: highest count, then the smallest (a, b)."""
    return max(counts, key=lambda pair: (counts[pair], -pair[0], -pair[1]))


def train_merges(
    text: str, vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN, special_tokens: Sequence[str] = ()
) -> list[Pair]:
    """The merges, in order, that grow the 256 bytes (+ specials) to ``vocab_size`` ids.

    Stops early when no pair is left to merge (a text too short for the vocabulary).
    """
    chunks = [list(chunk.encode("utf-8")) for chunk in training_chunks(text, pattern, special_tokens)]
    merges: list[Pair] = []
    for i in range(num_merges(vocab_size, len(special_tokens))):
        counts: dict[Pair, int] = {}
        for ids in chunks:  # recount everything, every time: the cost the fast trainer removes
            get_stats(ids, counts)
        if not counts:
            break
        pair = best_pair(counts)
        chunks = [merge(ids, pair, N_BYTES + i) for ids in chunks]
        merges.append(pair)
    return merges


def encode_chunk(data: bytes, ranks: dict[Pair, int]) -> list[int]:
    """Ids of one chunk: keep merging the adjacent pair with the lowest rank until none is left."""
    ids = list(data)
    while len(ids) >= 2:
        counts = get_stats(ids)
        pair = min(counts, key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break  # nothing left to merge
        ids = merge(ids, pair, ranks[pair])
    return ids


def encode_ids(
    text: str,
    merges: Sequence[Sequence[int]],
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    allowed_special: AllowedSpecial = "none_raise",
) -> list[int]:
    """Token ids of ``text`` under ``merges``; special tokens only where ``allowed_special`` allows."""
    pairs = as_pairs(merges)
    ranks = {pair: N_BYTES + i for i, pair in enumerate(pairs)}
    special_ids = special_token_ids(len(pairs), special_tokens)
    ids: list[int] = []
    for piece, is_special in segments(text, special_tokens, allowed_special):
        if is_special:
            ids.append(special_ids[piece])
            continue
        for chunk in split_chunks(piece, pattern):
            ids.extend(encode_chunk(chunk.encode("utf-8"), ranks))
    return ids


def _expand(token: int, merges: list[Pair]) -> bytes:
    if token < N_BYTES:
        return bytes([token])
    a, b = merges[token - N_BYTES]
    return _expand(a, merges) + _expand(b, merges)


def decode_ids(ids: Sequence[int], merges: Sequence[Sequence[int]], special_tokens: Sequence[str] = ()) -> str:
    """The text of ``ids``: bytes joined, then decoded as UTF-8 with U+FFFD for invalid sequences.

    Join first, decode after: a token may hold half a character (an emoji's first two bytes),
    so decoding token by token would garble text that round-trips fine as a whole.
    """
    pairs = as_pairs(merges)
    special_by_id = {i: s.encode("utf-8") for s, i in special_token_ids(len(pairs), special_tokens).items()}
    out = b""
    for token in ids:
        if token in special_by_id:
            out += special_by_id[token]
        elif 0 <= token < N_BYTES + len(pairs):
            out += _expand(token, pairs)
        else:
            last = N_BYTES + len(pairs) + len(special_by_id) - 1
            raise ValueError(f"token id {token} is outside the vocabulary (0..{last})")
    return out.decode("utf-8", errors="replace")


def roundtrip(
    text: str,
    merges: Sequence[Sequence[int]],
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    allowed_special: AllowedSpecial = "none_raise",
) -> str:
    """``decode(encode(text))`` with the naive encoder and decoder."""
    ids = encode_ids(text, merges, pattern, special_tokens, allowed_special)
    return decode_ids(ids, merges, special_tokens)
