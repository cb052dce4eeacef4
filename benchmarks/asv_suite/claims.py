"""One asv ``track_`` benchmark per measured claim, generated from ``specs/*.toml``.

asv treats a larger figure as a regression, so every claim is recorded lower-is-better, decided
from its bound (the seed's direction):

- ``bound = { max = X }``: the metric is lower-is-better already (a time, a loss, an exponent,
  a memory ratio fast/naive): recorded as measured.
- ``bound = { min = X }``: higher is better (a speedup, a throughput, a reduction factor): recorded
  as ``1/value`` (a slowdown), ``1 - value`` for a fraction, ``-value`` for a signed figure (a bound <= 0).
- both: the claim is a band around a target: recorded as the distance from its centre.

The specs are read from this checkout's ``specs/`` with ``tomllib`` alone, not through the
installed ``harness``: ``asv run RANGE`` installs past commits, whose ``harness`` may not know
today's spec keys. A claim's workload is imported only when it runs, from the installed commit,
so a workload that did not exist yet shows as a failed point on that commit. Workloads run in
quick mode on the CPU; claims that are CPU-less, full-size only (``quick = false``) or marked
``asv = "none"`` are not generated.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"
DEFAULT_TIMEOUT_S = 1800


def benchmark_name(slug: str, claim: str) -> str:
    """The asv name of a claim: ``track_<slug>__<claim name>`` in lower-case snake case."""
    def snake(text: str) -> str:
        return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")

    return f"track_{snake(slug)}__{snake(claim)}"


def direction(bound: dict[str, float], metric: str, unit: str) -> tuple[Callable[[float], float], str]:
    """How a measured value becomes a lower-is-better figure, and the unit the dashboard shows.

    Returns ``(record, unit)``: ``record(value)`` is what asv stores. Raises ValueError for a
    bound with neither side.
    """
    shown = unit or metric
    if "min" in bound and "max" in bound:
        centre = (bound["min"] + bound["max"]) / 2
        return (lambda v: abs(v - centre)), f"|{shown} - {centre:g}|, lower is better"
    if "min" in bound:
        if metric == "fraction":
            return (lambda v: 1.0 - v), "1 - fraction, lower is better"
        if bound["min"] <= 0:  # a signed figure (a delta): 1/value would flip at 0
            return (lambda v: -v), f"-({shown}), lower is better"
        return _inverse, f"1/({shown}), lower is better"
    if "max" in bound:
        return (lambda v: v), f"{shown}, lower is better"
    raise ValueError(f"bound {bound!r} has neither min nor max")


def _inverse(value: float) -> float:
    if not value > 0:  # also NaN: 1/0 or a negative slowdown would record a wrong direction
        raise ValueError(f"cannot record 1/value of a degenerate figure {value!r}")
    return 1.0 / value


def _workload(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _benchmark(name: str, workload: str, record: Callable[[float], float], unit: str, timeout_s: float):
    def track() -> float:
        from harness.measure import Context  # the installed commit's harness, as its workloads expect

        ctx = Context(quick=True)
        ctx.device = "cpu"  # older Contexts had no device field; their workloads never read it
        value = float(_workload(workload)(ctx).value)
        if math.isnan(value):
            raise ValueError(f"{workload} measured NaN")
        return record(value)

    track.__name__ = track.__qualname__ = name  # asv names a benchmark by its function's name
    track.__doc__ = f"Claim measured by {workload} (quick mode, CPU), recorded lower-is-better."
    track.unit = unit
    track.timeout = timeout_s
    return track


def claims(specs_dir: Path = SPECS_DIR) -> list[dict]:
    """Every claim the suite tracks: ``name``, ``workload``, ``unit``, ``record``, ``timeout_s``."""
    tracked = []
    for path in sorted(specs_dir.glob("*.toml")):
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
        if spec.get("status") != "implemented":
            continue
        for claim in spec.get("claim", []):
            if (claim.get("asv") == "none" or "cpu" not in claim.get("devices", [])
                    or not claim.get("quick", True) or not claim.get("workload")):
                continue
            record, unit = direction(claim["bound"], claim["metric"], claim.get("unit", ""))
            tracked.append({
                "name": benchmark_name(spec["slug"], claim["name"]), "workload": claim["workload"],
                "unit": unit, "record": record, "timeout_s": claim.get("timeout_s", DEFAULT_TIMEOUT_S),
            })
    return tracked


for _claim in claims():
    globals()[_claim["name"]] = _benchmark(
        _claim["name"], _claim["workload"], _claim["record"], _claim["unit"], _claim["timeout_s"])
