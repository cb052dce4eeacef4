"""Mutants of project 2: plausible tokenizer bugs, each rejected by a check of specs/02.

Each has the call shape of the callable it replaces.
"""

from __future__ import annotations

from impl.bpe import fast
from impl.bpe.naive import best_pair, get_stats, merge
from impl.bpe.regex_split import GPT4_SPLIT_PATTERN, segments, split_chunks, training_chunks
from impl.bpe.vocab import N_BYTES, num_merges


def _train_loop(chunks: list[list[int]], n_merges: int, pick) -> list[tuple[int, int]]:
    merges = []
    for i in range(n_merges):
        counts: dict = {}
        for ids in chunks:
            get_stats(ids, counts)
        if not counts:
            break
        pair = pick(counts)
        chunks = [merge(ids, pair, N_BYTES + i) for ids in chunks]
        merges.append(pair)
    return merges


def tiebreak_first_seen(text, vocab_size, pattern=GPT4_SPLIT_PATTERN, special_tokens=()):
    """Ties go to the pair seen first (minbpe's ``max(stats, key=stats.get)``), not the smallest pair."""
    chunks = [list(c.encode("utf-8")) for c in training_chunks(text, pattern, special_tokens)]
    return _train_loop(chunks, num_merges(vocab_size, len(special_tokens)), lambda c: max(c, key=c.get))


def unique_chunks_unweighted(text, vocab_size, pattern=GPT4_SPLIT_PATTERN, special_tokens=()):
    """Deduplicates chunks but forgets to weight each by how often it occurs."""
    unique = dict.fromkeys(training_chunks(text, pattern, special_tokens))
    chunks = [list(c.encode("utf-8")) for c in unique]
    return _train_loop(chunks, num_merges(vocab_size, len(special_tokens)), best_pair)


def _leftmost_first(data: bytes, ranks: dict) -> list[int]:
    ids = list(data)
    while True:
        at = next((i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) in ranks), None)
        if at is None:
            return ids
        ids[at : at + 2] = [ranks[(ids[at], ids[at + 1])]]


def leftmost_pair_first(text, merges, pattern=GPT4_SPLIT_PATTERN, special_tokens=(), allowed_special="none_raise"):
    """Merges applied in the wrong order: the leftmost known pair first instead of the lowest rank."""
    ranks = {tuple(p): N_BYTES + i for i, p in enumerate(merges)}
    special_ids = {t: N_BYTES + len(merges) + i for i, t in enumerate(special_tokens)}
    ids = []
    for piece, is_special in segments(text, special_tokens, allowed_special):
        if is_special:
            ids.append(special_ids[piece])
        else:
            for chunk in split_chunks(piece, pattern):
                ids.extend(_leftmost_first(chunk.encode("utf-8"), ranks))
    return ids


def special_check_missing(text, merges, pattern=GPT4_SPLIT_PATTERN, special_tokens=(), allowed_special="none_raise"):
    """Never refuses: special-token strings in user text are silently encoded as plain text."""
    if allowed_special == "none_raise":
        allowed_special = "none"
    return fast.encode_ids(text, merges, pattern, special_tokens, allowed_special)


def decode_ignores_invalid(ids, merges, special_tokens=()):
    """Drops invalid UTF-8 instead of writing U+FFFD (``errors="ignore"``)."""
    return fast.FastEncoder(merges, special_tokens=special_tokens).decode_bytes(ids).decode("utf-8", errors="ignore")


def decode_per_token(ids, merges, special_tokens=()):
    """Decodes each token's bytes on its own: a character split across tokens turns into U+FFFD."""
    enc = fast.FastEncoder(merges, special_tokens=special_tokens)
    return "".join(enc.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids)


def roundtrip_per_token(text, merges, pattern=GPT4_SPLIT_PATTERN, special_tokens=(), allowed_special="none_raise"):
    """Round trip through ``decode_per_token``."""
    ids = fast.encode_ids(text, merges, pattern, special_tokens, allowed_special)
    return decode_per_token(ids, merges, special_tokens)


def roundtrip_pattern_gaps(text, merges, pattern=GPT4_SPLIT_PATTERN, special_tokens=(), allowed_special="none_raise"):
    """A split pattern without its last ``|\\s`` branch: ``findall`` silently drops what it misses."""
    enc = fast.FastEncoder(merges, pattern.removesuffix(r"|\s"), special_tokens)
    return enc.decode(enc.encode(text, allowed_special))
