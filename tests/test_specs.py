"""Every ``[[check]]`` of every implemented spec, as pytest tests: one per edge case, one
hypothesis property, and one per mutant proving the check rejects it (the verifier verified).

Test ids read ``spec/check/case``, e.g. ``kv_cache/greedy-tokens-identical/edge:len1``.
"""

from __future__ import annotations

import re

import pytest

from harness.checks import cases_of, implementations, mutant_rejected, run_case, run_strategy
from harness.spec import SPECS_DIR, SpecError, load_spec


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


SPECS, BROKEN = [], []
for path in sorted(SPECS_DIR.glob("*.toml")):
    try:
        spec = load_spec(path)
    except SpecError as e:  # one broken spec fails its own test, not the whole collection
        BROKEN.append(str(e))
        continue
    if spec.implemented:
        SPECS.append(spec)
EDGE, STRATEGY, MUTANTS = [], [], []
for spec in SPECS:
    for check in spec.checks:
        base = f"{spec.slug}/{_slug(check.name)}"
        cases = cases_of(check)
        for case_id, case in zip(cases.edge_ids(), cases.edge, strict=True):
            EDGE.append(pytest.param(spec, check, case, id=f"{base}/edge:{case_id}"))
        if cases.strategy is not None:
            STRATEGY.append(pytest.param(spec, check, id=f"{base}/hypothesis"))
        for mutant in check.mutants:
            MUTANTS.append(pytest.param(spec, check, mutant, id=f"{base}/mutant:{mutant.split(':')[-1]}"))


def test_every_spec_is_valid():
    assert not BROKEN, "\n".join(BROKEN)


@pytest.mark.parametrize(("spec", "check", "case"), EDGE)
def test_edge_case(spec, check, case):
    run_case(check, implementations(spec, check), case)


@pytest.mark.parametrize(("spec", "check"), STRATEGY)
def test_hypothesis_property(spec, check):
    run_strategy(check, implementations(spec, check))


@pytest.mark.timeout(300)  # a mutant that loops forever is rejected by nothing: fail it
@pytest.mark.parametrize(("spec", "check", "mutant"), MUTANTS)
def test_mutant_is_rejected(spec, check, mutant):
    rejected, how = mutant_rejected(spec, check, mutant)
    assert rejected, f"mutant {mutant} survived check '{check.name}' of {spec.path.name}: {how}"
