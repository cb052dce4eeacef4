"""The asv suite, generated from the specs: one ``track_`` benchmark per measured claim.

asv treats larger as worse, so each claim records a figure where lower is better: a speedup
or throughput is recorded as its inverse (a slowdown), a loss or a byte count as itself. The
workloads run in quick mode, so a dashboard point costs minutes, not tens of minutes.
"""

from __future__ import annotations

import re

from harness.measure import Context
from harness.spec import load_specs, resolve


def _benchmark(name: str, workload: str, mode: str, unit: str):
    def track() -> float:
        value = float(resolve(workload)(Context(quick=True)).value)
        return 1.0 / value if mode == "inverse" else value

    track.__name__ = track.__qualname__ = name  # asv names a benchmark by its function's name
    track.unit = f"1/({unit})" if mode == "inverse" and unit else unit or "value"
    track.number, track.repeat, track.rounds, track.timeout = 1, 1, 1, 1800
    return track


for _spec in load_specs(check_import=False):  # workloads only: tests/ is not installed
    if not _spec.implemented:
        continue
    for _claim in _spec.claims:
        if _claim.asv == "none" or "cpu" not in _claim.devices:
            continue
        _name = "track_" + re.sub(r"[^a-z0-9]+", "_", f"{_spec.slug}__{_claim.name}".lower()).strip("_")
        globals()[_name] = _benchmark(_name, _claim.workload, _claim.asv, _claim.unit)
