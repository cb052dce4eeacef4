"""What a check runs on: fixed edge cases first, then a hypothesis strategy over the space.

A spec's ``cases = "tests.cases.kv_cache:prompts"`` names a ``Cases`` object. Each case is a
dict of keyword arguments for the implementations under test. A case may carry ``dtype``: the
harness pops it and casts every floating tensor in the case to it (and to float64 for the
oracle of an ``allclose`` check), so one case serves every precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st


@dataclass(frozen=True)
class Cases:
    """Edge cases (list of kwargs dicts, each with an optional ``id``) and a hypothesis strategy."""

    edge: list[dict[str, Any]] = field(default_factory=list)
    strategy: st.SearchStrategy | None = None

    def edge_ids(self) -> list[str]:
        """Readable pytest ids: the case's ``id`` key, else its position."""
        return [str(case.get("id", i)) for i, case in enumerate(self.edge)]
