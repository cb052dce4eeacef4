"""Micro-benchmarks on pytest-benchmark: for every implemented spec, each implementation of each
``exact`` / ``allclose`` check timed on that check's largest edge case, grouped by spec.

Never asserts a time. ``nox -s test`` skips it (``--benchmark-skip``); run it with ``nox -s micro`` (or
``nox -s test -- --benchmark-only``): results are autosaved under ``.benchmarks/``, so
``pytest-benchmark compare`` shows a kernel's history across commits. Property checks are left out:
their property wraps the implementation (training runs, generation loops), so the call they would time
is the property, not the kernel.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from harness.checks import cases_of, cast_case, implementations
from harness.spec import SPECS_DIR, SpecError, load_spec

TARGET_S = 0.5  # time spent per benchmark after its warm-up call, about
MAX_ROUNDS = 10


def case_size(value) -> int:
    """Elements in every tensor of a case (nested), the measure of 'largest'."""
    if torch.is_tensor(value):
        return value.numel()
    if isinstance(value, dict):
        return sum(case_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(case_size(v) for v in value)
    return 0


def largest_case(edge: list[dict]) -> dict:
    """The edge case with the most tensor elements (the last of equals; the longest repr when no case has
    tensors)."""
    return max(reversed(edge), key=lambda case: (case_size(case), len(repr(case))))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


PARAMS = []
for path in sorted(SPECS_DIR.glob("*.toml")):
    try:
        spec = load_spec(path)
    except SpecError:
        continue  # test_specs.py fails a broken spec
    if not spec.implemented:
        continue
    for check in spec.checks:
        if check.kind == "property":
            continue
        edge = cases_of(check).edge
        if not edge:
            continue
        for name in check.compare:
            PARAMS.append(pytest.param(spec, check, name, id=f"{spec.slug}/{_slug(check.name)}/{name}"))


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    """A plain `pytest tests` skips the suite too (it is minutes of timing, not a check)."""
    if not request.config.getoption("benchmark_only"):
        pytest.skip("micro-benchmark: run with --benchmark-only (nox -s micro)")


@pytest.mark.parametrize(("spec", "check", "name"), PARAMS)
def test_micro(benchmark, spec, check, name):
    fn = implementations(spec, check)[name]
    case = largest_case(cases_of(check).edge)
    dtype = case.get("dtype")
    benchmark.group = spec.slug
    benchmark.extra_info.update(check=check.name, case=str(case.get("id", "")), dtype=str(dtype or ""))
    def timed() -> float:
        start = time.perf_counter()
        fn(**cast_case(case, dtype))
        return max(time.perf_counter() - start, 1e-6)

    took = timed()  # warm-up: lazy imports, compiled kernels, caches
    if took < TARGET_S:
        took = timed()  # a warm call sizes the rounds
    rounds = max(1, min(MAX_ROUNDS, int(TARGET_S / took)))
    benchmark.pedantic(fn, setup=lambda: ((), cast_case(case, dtype)), rounds=rounds, iterations=1)
