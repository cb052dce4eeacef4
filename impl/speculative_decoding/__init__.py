"""Project 11: speculative decoding. A draft model (or Medusa heads) proposes k tokens, the target
verifies them in one forward, accept / reject keeps the target's output (greedy) or its distribution
(sampling). ``verify`` holds the pure accept functions the engine reuses; ``naive`` the textbook loop;
``fast`` the cached one with adaptive k; ``medusa`` multi-token prediction heads as the drafter."""

from impl.speculative_decoding.fast import Speculation, Stats, speculative_generate
from impl.speculative_decoding.verify import greedy_accept, sampled_accept

__all__ = ["Speculation", "Stats", "greedy_accept", "sampled_accept", "speculative_generate"]
