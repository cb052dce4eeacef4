"""Byte-level BPE, fast: same merges and same ids as ``naive.py``, without the repeated work.

Training keeps the pair counts up to date instead of recounting the whole corpus per merge:
- chunks are deduplicated first (" the" occurs ~27K times in Shakespeare; it is one word with a count);
- an index from each pair to the words containing it means a merge touches only those words;
- a max-heap of (count, pair) with lazy invalidation finds the next merge in O(log n).
Encoding caches the ids of every chunk seen, and merges a new chunk with a heap of
(rank, position) over a linked list: O(n log n) instead of the naive O(n^2) rescans.
Decoding looks each id up in a bytes table built once.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import pairwise

from tqdm import tqdm

from impl.bpe.naive import merge
from impl.bpe.regex_split import GPT4_SPLIT_PATTERN, AllowedSpecial, compiled, segments, training_chunks
from impl.bpe.vocab import N_BYTES, Pair, as_pairs, num_merges, special_token_ids, token_bytes


def train_merges(
    text: str,
    vocab_size: int,
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    progress: bool = False,
) -> list[Pair]:
    """The merges, in order, for ``vocab_size`` ids: identical to ``naive.train_merges``.

    Tie-break as in naive: highest count, then the smallest pair, which is exactly the order
    of heap entries (-count, a, b).
    """
    n_merges = num_merges(vocab_size, len(special_tokens))
    word_counts = Counter(training_chunks(text, pattern, special_tokens))  # unique chunks with counts
    words = [list(word.encode("utf-8")) for word in word_counts]
    freqs = list(word_counts.values())

    counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)  # pair -> indices of words that (may) contain it
    for w, ids in enumerate(words):
        for pair in pairwise(ids):
            counts[pair] += freqs[w]
            where[pair].add(w)
    heap = [(-count, a, b) for (a, b), count in counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    bar = tqdm(total=n_merges, desc="bpe merges", unit="merge", disable=not progress)
    while len(merges) < n_merges and heap:
        neg_count, a, b = heapq.heappop(heap)
        count = counts.get((a, b), 0)
        if count != -neg_count:
            # lazy invalidation: the entry is stale; a fell count is re-queued here, a risen
            # one was already pushed when it rose, a vanished one is dropped
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        pair, new_id = (a, b), N_BYTES + len(merges)
        merges.append(pair)
        bar.update()
        delta: dict[Pair, int] = defaultdict(int)
        for w in where.pop(pair):
            old = words[w]
            new = merge(old, pair, new_id)
            if len(new) == len(old):
                continue  # stale index entry: an earlier merge already consumed this pair here
            # recount this word's pairs: simpler than patching neighbours, and exact for overlaps
            for p in pairwise(old):
                delta[p] -= freqs[w]
            for p in pairwise(new):
                delta[p] += freqs[w]
                where[p].add(w)
            words[w] = new
        for p, d in delta.items():
            if d == 0:
                continue
            counts[p] += d
            if counts[p] == 0:
                del counts[p]
            elif d > 0:
                heapq.heappush(heap, (-counts[p], *p))
    bar.close()
    return merges


class FastEncoder:
    """Encoder and decoder for one set of merges, with a cache of chunk -> ids."""

    def __init__(
        self,
        merges: Sequence[Sequence[int]],
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: Sequence[str] = (),
        cache_size: int = 1 << 20,
    ):
        self.merges = as_pairs(merges)
        self.ranks = {pair: N_BYTES + i for i, pair in enumerate(self.merges)}
        self.special_ids = special_token_ids(len(self.merges), special_tokens)
        self.regex = compiled(pattern)
        self.table = token_bytes(self.merges) + [s.encode("utf-8") for s in self.special_ids]
        self.cache: dict[str, list[int]] = {}
        self.cache_size = cache_size

    def encode_chunk(self, data: bytes) -> list[int]:
        """Ids of one chunk: lowest-rank pair first, leftmost among equals (heap + linked list)."""
        ids = list(data)
        n = len(ids)
        ranks = self.ranks
        nxt = list(range(1, n + 1))  # next live position (n = end)
        prv = list(range(-1, n - 1))  # previous live position (-1 = start)
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((ids[i], ids[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            # stale entry: position i was absorbed, or its pair changed since it was pushed
            if ids[i] < 0 or j >= n or ranks.get((ids[i], ids[j])) != rank:
                continue
            ids[i], ids[j] = rank, -1  # a merge's rank is the id it creates
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
                r = ranks.get((rank, ids[nxt[i]]))
                if r is not None:
                    heapq.heappush(heap, (r, i))
            if prv[i] >= 0:
                r = ranks.get((ids[prv[i]], rank))
                if r is not None:
                    heapq.heappush(heap, (r, prv[i]))
        return [t for t in ids if t >= 0]

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token strings treated as plain text."""
        out: list[int] = []
        cache = self.cache
        for chunk in self.regex.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                if len(cache) >= self.cache_size:
                    cache.clear()  # bounded memory on endless streams; natural text refills it fast
                ids = cache[chunk] = self.encode_chunk(chunk.encode("utf-8"))
            out.extend(ids)
        return out

    def encode(self, text: str, allowed_special: AllowedSpecial = "none_raise") -> list[int]:
        """Ids of ``text``; registered special tokens are refused unless ``allowed_special`` allows."""
        if not self.special_ids:
            return self.encode_ordinary(text)
        out: list[int] = []
        for piece, is_special in segments(text, self.special_ids, allowed_special):
            if is_special:
                out.append(self.special_ids[piece])
            else:
                out.extend(self.encode_ordinary(piece))
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of ``ids`` (may end inside a UTF-8 character)."""
        try:
            return b"".join([self.table[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < len(self.table)))
            raise ValueError(f"token id {bad!r} is outside the vocabulary (0..{len(self.table) - 1})") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; invalid UTF-8 (a cut character) becomes U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def encode_ids(
    text: str,
    merges: Sequence[Sequence[int]],
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    allowed_special: AllowedSpecial = "none_raise",
) -> list[int]:
    """Token ids of ``text`` (the check's call shape for ``FastEncoder.encode``)."""
    return FastEncoder(merges, pattern, special_tokens).encode(text, allowed_special)


def decode_ids(ids: Sequence[int], merges: Sequence[Sequence[int]], special_tokens: Sequence[str] = ()) -> str:
    """The text of ``ids`` (the check's call shape for ``FastEncoder.decode``)."""
    return FastEncoder(merges, special_tokens=special_tokens).decode(ids)


def roundtrip(
    text: str,
    merges: Sequence[Sequence[int]],
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Sequence[str] = (),
    allowed_special: AllowedSpecial = "none_raise",
) -> str:
    """``decode(encode(text))`` with the fast encoder and decoder."""
    encoder = FastEncoder(merges, pattern, special_tokens)
    return encoder.decode(encoder.encode(text, allowed_special))
