"""An exact-match response cache: the same prompt with the same deterministic settings gets the stored answer.

Keys are the prompt's token ids and the request's sampling settings (any hashable value: the engine passes its
frozen ``SamplingParams``), so a greedy answer is never served for a sampled request or for another
``max_tokens``. Entries leave in least-recently-used order when ``capacity`` is reached, and after ``ttl_s``
seconds since they were stored (a model or a document may change behind a cache: a TTL bounds how stale an
answer can be). ``hits``, ``misses``, ``evictions`` and ``expirations`` feed the metrics.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedResponse:
    """A stored answer: the generated ids and why generation ended."""

    tokens: tuple[int, ...]
    finish_reason: str


class ResponseCache:
    """LRU map (prompt ids, settings) -> ``CachedResponse`` with a time to live."""

    def __init__(self, capacity: int = 1024, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive (or None: no expiry), got {ttl_s}")
        self.capacity, self.ttl_s, self.clock = capacity, ttl_s, clock
        self._entries: OrderedDict[tuple, tuple[float, CachedResponse]] = OrderedDict()  # oldest use first
        self.hits = self.misses = self.evictions = self.expirations = 0

    @staticmethod
    def key(prompt: Sequence[int], settings: Hashable) -> tuple:
        return tuple(int(t) for t in prompt), settings

    def get(self, prompt: Sequence[int], settings: Hashable) -> CachedResponse | None:
        """The stored answer (now the most recently used), or None on a miss or an expired entry."""
        key = self.key(prompt, settings)
        entry = self._entries.get(key)
        if entry is not None and self.ttl_s is not None and self.clock() - entry[0] >= self.ttl_s:
            del self._entries[key]
            self.expirations += 1
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, prompt: Sequence[int], settings: Hashable, tokens: Sequence[int], finish_reason: str) -> None:
        """Store (or refresh) an answer, evicting the least recently used entry when full."""
        key = self.key(prompt, settings)
        self._entries[key] = (self.clock(), CachedResponse(tuple(int(t) for t in tokens), finish_reason))
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, float]:
        """Counters and the hit rate (hits / lookups)."""
        lookups = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "expirations": self.expirations, "entries": len(self),
                "hit_rate": self.hits / lookups if lookups else 0.0}
