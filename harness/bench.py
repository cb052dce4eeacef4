"""Run every ``[[claim]]`` under the measurement rules and give it a verdict.

Verdicts: holds, fails, n/a (device not where the claim is expected), error (traceback kept),
planned. Results merge into ``reports/out/results.json`` project by project, so ``-k`` re-measures
one project and keeps the others (each project records its own environment).
"""

from __future__ import annotations

import json
import math
import re
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from harness.measure import Context, Result, environment
from harness.spec import Claim, Spec, resolve

OUT_DIR = Path(__file__).resolve().parent.parent / "reports" / "out"
RESULTS = OUT_DIR / "results.json"
SUSPICIOUS_FACTOR = 10  # a ratio 10x beyond the seed's largest figure is flagged for review


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def judge(value: float, bound: dict[str, float]) -> str:
    """holds when ``value`` meets every side of ``bound``, else fails (NaN fails)."""
    if math.isnan(value):
        return "fails"
    if "min" in bound and value < bound["min"]:
        return "fails"
    if "max" in bound and value > bound["max"]:
        return "fails"
    return "holds"


def too_good(claim: Claim, value: float) -> bool:
    """A speedup/ratio far beyond anything the seed text names (e.g. > 100x for "2-4x")."""
    if claim.metric not in ("speedup", "ratio", "memory_ratio"):
        return False
    figures = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", claim.seed)]
    return bool(figures) and value > SUSPICIOUS_FACTOR * max(figures)


def run_claim(spec: Spec, claim: Claim, ctx: Context) -> dict[str, Any]:
    """Measure one claim; the returned row is what results.json and the report show."""
    row: dict[str, Any] = {
        "name": claim.name, "seed": claim.seed, "metric": claim.metric, "unit": claim.unit,
        "bound": claim.bound, "devices": claim.devices, "gate": claim.gate, "note": claim.note,
        "device": ctx.device, "value": None, "spread": None, "details": {}, "plots": [], "text": "",
    }
    if not spec.implemented:
        return row | {"verdict": "planned"}
    if ctx.device not in claim.devices:
        reason = claim.na_reason or f"expected on {', '.join(claim.devices)}, this machine is {ctx.device}"
        return row | {"verdict": "n/a", "na_reason": reason}
    start = time.perf_counter()
    try:
        result = resolve(claim.workload)(ctx)
        if not isinstance(result, Result):
            raise TypeError(f"workload {claim.workload} returned {type(result).__name__}, not a Result")
    except Exception:
        return row | {"verdict": "error", "error": traceback.format_exc(), "seconds": time.perf_counter() - start}
    row |= result.to_json()
    row["unit"] = result.unit or claim.unit
    row["verdict"] = judge(float(result.value), claim.bound)
    row["seconds"] = time.perf_counter() - start
    row["flagged"] = too_good(claim, float(result.value))
    return row


def run(specs: list[Spec], quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Measure the claims of ``specs`` and merge them into results.json; returns the whole file."""
    ctx = Context(quick=quick, device=device_kind(), threads=torch.get_num_threads())
    env = environment() | {"quick": quick}
    previous = load_results()
    by_slug = {p["slug"]: p for p in previous.get("projects", [])}
    todo = [(spec, claim) for spec in specs for claim in spec.claims]
    bar = tqdm(todo, desc="claims", disable=not progress, unit="claim")
    rows: dict[str, list[dict[str, Any]]] = {spec.slug: [] for spec in specs}
    for spec, claim in bar:
        bar.set_postfix_str(f"{spec.slug}: {claim.name}"[:60])
        rows[spec.slug].append(run_claim(spec, claim, ctx))
    for spec in specs:
        by_slug[spec.slug] = project_entry(spec) | {"claims": rows[spec.slug], "environment": env}
    results = {"updated": env["date"], "projects": sorted(by_slug.values(), key=lambda p: p["project"])}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(RESULTS)
    return results


def project_entry(spec: Spec) -> dict[str, Any]:
    """What the report shows of a spec besides its measured claims."""
    return {
        "project": spec.project, "slug": spec.slug, "title": spec.title, "phase": spec.phase,
        "status": spec.status, "seed_outcome": spec.seed_outcome, "builds": spec.builds,
        "papers": spec.papers, "readme": spec.readme,
        "implementations": spec.implementations, "references": spec.references,
        "checks": [{"name": c.name, "kind": c.kind, "compare": c.compare, "mutants": c.mutants}
                   for c in spec.checks],
    }


def load_results() -> dict[str, Any]:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"projects": []}


def gate_failures(results: dict[str, Any], slugs: set[str]) -> list[str]:
    """Lines naming each gated claim that failed and each claim that errored, in ``slugs``."""
    bad = []
    for project in results["projects"]:
        if project["slug"] not in slugs:
            continue
        for claim in project["claims"]:
            if claim["verdict"] == "error":
                bad.append(f"P{project['project']} {project['slug']}: '{claim['name']}' errored")
            elif claim["verdict"] == "fails" and claim["gate"]:
                bad.append(f"P{project['project']} {project['slug']}: gated claim '{claim['name']}' "
                           f"fails: measured {claim['value']:.4g} against bound {claim['bound']}")
    return bad
