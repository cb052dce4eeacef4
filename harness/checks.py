"""Run a spec's ``[[check]]`` on a case, and prove that its mutants are rejected.

A failed comparison raises ``CheckFailed`` with a sentence naming the implementation, the
check and the error; anything else an implementation raises propagates as itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings

from harness.cases import Cases
from harness.spec import Check, Spec, resolve

LOW_PRECISION = (torch.bfloat16, torch.float16)


class CheckFailed(AssertionError):
    """An implementation disagreed with the check."""


def cast_case(case: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """A copy of ``case`` without ``id``/``dtype``, floating tensors cast to ``dtype`` (if given)."""

    def cast(value: Any) -> Any:
        if torch.is_tensor(value):
            value = value.clone()
            return value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and any(torch.is_tensor(v) for v in value):
            return type(value)(cast(v) for v in value)
        return value

    return {k: cast(v) for k, v in case.items() if k not in ("id", "dtype")}


def leaves(output: Any) -> list[Any]:
    """The tensors/values of a (nested) output, in a fixed order."""
    if isinstance(output, dict):
        return [x for k in sorted(output) for x in leaves(output[k])]
    if isinstance(output, (list, tuple)) and any(torch.is_tensor(v) or isinstance(v, (list, tuple, dict))
                                                 for v in output):
        return [x for v in output for x in leaves(v)]
    return [output]


def _equal(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _max_error(out: Any, ref: Any) -> float:
    """Largest absolute difference over all leaves (inf on shape mismatch or a NaN)."""
    worst = 0.0
    a_leaves, b_leaves = leaves(out), leaves(ref)
    if len(a_leaves) != len(b_leaves):
        return float("inf")
    for a, b in zip(a_leaves, b_leaves, strict=True):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        if a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            continue
        diff = (a - b).abs()
        if torch.isnan(diff).any():
            return float("inf")
        worst = max(worst, diff.max().item())
    return worst


def _allclose(out: Any, ref: Any, rtol: float, atol: float) -> bool:
    a_leaves, b_leaves = leaves(out), leaves(ref)
    if len(a_leaves) != len(b_leaves):
        return False
    for a, b in zip(a_leaves, b_leaves, strict=True):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
            return False
    return True


def run_case(check: Check, fns: dict[str, Callable[..., Any]], case: dict[str, Any]) -> None:
    """Judge one case; raises ``CheckFailed`` when an implementation disagrees."""
    dtype = case.get("dtype")
    if check.kind == "property":
        prop = resolve(check.property)
        for name in check.compare:
            try:
                prop(fns[name], **cast_case(case, dtype))
            except AssertionError as e:
                raise CheckFailed(f"{name} violates '{check.name}': {e}") from e
        return
    if check.kind == "exact":
        outputs = {name: fns[name](**cast_case(case, dtype)) for name in check.compare}
        first = check.compare[0]
        for name in check.compare[1:]:
            a, b = leaves(outputs[first]), leaves(outputs[name])
            if len(a) != len(b) or not all(_equal(x, y) for x, y in zip(a, b, strict=True)):
                raise CheckFailed(f"{name} output differs from {first} ('{check.name}', exact)")
        return
    # allclose: the tolerance rule of DESIGN.md, against a float64 oracle
    truth = fns[check.oracle](**cast_case(case, torch.float64))
    outputs = {name: fns[name](**cast_case(case, dtype)) for name in check.compare}
    if dtype in LOW_PRECISION:
        yardstick = _max_error(outputs[check.baseline], truth)
        # the yardstick must itself be sound: a baseline that overflowed (inf) would let k * inf pass
        # anything, and one far from the truth would excuse any error
        scale = max((torch.as_tensor(t).double().abs().max().item() for t in leaves(truth)
                     if torch.as_tensor(t).numel()), default=0.0)
        limit = check.baseline_rtol * scale + check.floor
        if not yardstick <= limit:
            raise CheckFailed(
                f"baseline {check.baseline} in {dtype}: max error {yardstick:.3g} vs float64 {check.oracle} is not "
                f"a finite yardstick within baseline_rtol {check.baseline_rtol} x max|truth| {scale:.3g} + "
                f"{check.floor} ('{check.name}')"
            )
        for name in check.compare:
            err = _max_error(outputs[name], truth)
            if name != check.baseline and not err <= check.k * yardstick + check.floor:
                raise CheckFailed(
                    f"{name} in {dtype}: max error {err:.3g} vs float64 {check.oracle} exceeds "
                    f"{check.k} x {check.baseline}'s {yardstick:.3g} + {check.floor} ('{check.name}')"
                )
    else:
        for name in check.compare:
            if not _allclose(outputs[name], truth, check.rtol, check.atol):
                err = _max_error(outputs[name], truth)
                raise CheckFailed(
                    f"{name}: max error {err:.3g} vs float64 {check.oracle} exceeds rtol {check.rtol}, "
                    f"atol {check.atol} ('{check.name}')"
                )


def implementations(spec: Spec, check: Check, mutant: str | None = None) -> dict[str, Callable[..., Any]]:
    """The callables a check compares; with ``mutant``, that replaces ``check.subject``."""
    fns = {name: resolve(spec.callable_path(name)) for name in check.compare}
    if mutant is not None:
        fns[check.subject] = resolve(mutant)
    return fns


def cases_of(check: Check) -> Cases:
    cases = resolve(check.cases)
    if not isinstance(cases, Cases):
        raise TypeError(f"{check.cases} is a {type(cases).__name__}, not a harness.cases.Cases")
    return cases


# HYPOTHESIS_PROFILE=nightly: 10x the examples, freshly random each run (the CI default stays
# derandomized: the same examples every run, so a red CI is reproducible)
PROFILES = {"ci": {"derandomize": True, "factor": 1}, "nightly": {"derandomize": False, "factor": 10}}


def hypothesis_profile() -> str:
    """The profile named by $HYPOTHESIS_PROFILE (default "ci"); an unknown name is an error."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r}: must be one of {', '.join(PROFILES)}")
    return name


def hypothesis_settings(check: Check, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    profile = PROFILES[hypothesis_profile()]
    return settings(
        max_examples=check.examples * profile["factor"],
        deadline=None,
        derandomize=profile["derandomize"],
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=not profile["derandomize"],  # a random failure prints how to reproduce it
    )


def run_strategy(check: Check, fns: dict[str, Callable[..., Any]], shrink: bool = True) -> None:
    """Run the check over the hypothesis strategy; raises on the first (shrunk) failure."""
    cases = cases_of(check)
    if cases.strategy is None:
        return

    @hypothesis_settings(check, shrink)
    @given(cases.strategy)
    def property_holds(case: dict[str, Any]) -> None:
        run_case(check, fns, case)

    property_holds()


def mutant_rejected(spec: Spec, check: Check, mutant: str) -> tuple[bool, str]:
    """Does the check fail with ``mutant`` in place of the subject? (rejected, how).

    Only a failed comparison counts: a mutant that crashes proves nothing about the check
    (its patch target may simply have moved), so a crash is reported as not rejected.
    """
    fns = implementations(spec, check, mutant)
    cases = cases_of(check)
    for case_id, case in zip(cases.edge_ids(), cases.edge, strict=True):
        try:
            run_case(check, fns, case)
        except CheckFailed as e:
            return True, f"edge case {case_id}: {str(e)[:200]}"
        except Exception as e:
            return False, f"crashed on edge case {case_id} instead of being caught: {e.__class__.__name__}: {e}"
    try:
        run_strategy(check, fns, shrink=False)
    except CheckFailed as e:
        return True, f"hypothesis: {str(e)[:200]}"
    except Exception as e:
        return False, f"crashed under hypothesis instead of being caught: {e.__class__.__name__}: {e}"
    return False, "every edge case and hypothesis example passed"
