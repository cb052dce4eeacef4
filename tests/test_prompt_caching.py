"""The exact-match response cache (P10): LRU and TTL behaviour equal a simple model under random operations
(hypothesis stateful testing), and the model check rejects broken caches."""

from __future__ import annotations

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from impl.prompt_caching.response_cache import ResponseCache

PROMPTS = st.lists(st.integers(0, 3), min_size=1, max_size=2)  # few distinct prompts: many hits and evictions
SETTINGS = st.sampled_from(["greedy-8", "greedy-16"])


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def machine_for(cache_cls):
    class ResponseCacheMatchesModel(RuleBasedStateMachine):
        """Random puts, gets and clock moves; the model: a list of (key, stored_at, value), least recent first."""

        @initialize(capacity=st.integers(1, 4), ttl=st.sampled_from([None, 3.0, 10.0]))
        def start(self, capacity, ttl):
            self.clock = Clock()
            self.cache = cache_cls(capacity, ttl, clock=self.clock)
            self.capacity, self.ttl = capacity, ttl
            self.model: list[tuple[tuple, float, tuple]] = []
            self.counts = {"hits": 0, "misses": 0, "evictions": 0, "expirations": 0}

        def _find(self, key):
            return next((i for i, entry in enumerate(self.model) if entry[0] == key), None)

        @rule(prompt=PROMPTS, settings_=SETTINGS, tokens=st.lists(st.integers(0, 9), max_size=3))
        def put(self, prompt, settings_, tokens):
            key = (tuple(prompt), settings_)
            i = self._find(key)
            if i is not None:
                del self.model[i]
            self.model.append((key, self.clock.now, tuple(tokens)))
            while len(self.model) > self.capacity:
                self.model.pop(0)
                self.counts["evictions"] += 1
            self.cache.put(prompt, settings_, tokens, "length")

        @rule(prompt=PROMPTS, settings_=SETTINGS)
        def get(self, prompt, settings_):
            key = (tuple(prompt), settings_)
            i = self._find(key)
            want = None
            if i is not None and self.ttl is not None and self.clock.now - self.model[i][1] >= self.ttl:
                del self.model[i]
                self.counts["expirations"] += 1
                i = None
            if i is None:
                self.counts["misses"] += 1
            else:
                entry = self.model.pop(i)
                self.model.append(entry)  # now the most recently used
                self.counts["hits"] += 1
                want = entry[2]
            got = self.cache.get(prompt, settings_)
            assert (got.tokens if got else None) == want

        @rule(dt=st.sampled_from([0.5, 1.0, 4.0]))
        def wait(self, dt):
            self.clock.now += dt

        @invariant()
        def same_entries_and_counters(self):
            if not hasattr(self, "cache"):
                return
            assert len(self.cache) == len(self.model)
            stats = self.cache.stats()
            assert {k: stats[k] for k in self.counts} == self.counts

    return ResponseCacheMatchesModel


def run(cache_cls, examples: int = 60, shrink: bool = True) -> None:
    phases = list(Phase) if shrink else [Phase.explicit, Phase.generate]  # a mutant's failure needs no shrinking
    run_state_machine_as_test(machine_for(cache_cls), settings=settings(
        max_examples=examples, deadline=None, stateful_step_count=25, report_multiple_bugs=False,
        derandomize=True, database=None, phases=phases))  # the same examples every run: no flaky verdict


def test_response_cache_matches_an_lru_ttl_model():
    run(ResponseCache)


class _GetDoesNotRefresh(ResponseCache):
    def get(self, prompt, settings_):
        entry = self._entries.get(self.key(prompt, settings_))
        order = list(self._entries)
        got = super().get(prompt, settings_)
        if entry is not None and got is not None:  # undo the move to the end: eviction by insertion order (FIFO)
            self._entries = type(self._entries)((k, self._entries[k]) for k in order)
        return got


class _NeverExpires(ResponseCache):
    def __init__(self, capacity, ttl_s=None, clock=None):
        super().__init__(capacity, None, clock=clock)


class _KeyIgnoresSettings(ResponseCache):
    @staticmethod
    def key(prompt, settings_):
        return tuple(int(t) for t in prompt)  # a greedy answer for 8 tokens served to a request for 16


@pytest.mark.parametrize("broken", [_GetDoesNotRefresh, _NeverExpires, _KeyIgnoresSettings],
                         ids=["fifo-not-lru", "no-ttl", "key-ignores-settings"])
def test_the_model_check_rejects_a_broken_cache(broken):
    with pytest.raises(AssertionError):
        run(broken, examples=200, shrink=False)


def test_bad_cache_settings_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        ResponseCache(0)
    with pytest.raises(ValueError, match="ttl_s"):
        ResponseCache(4, ttl_s=0)
