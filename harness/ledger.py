"""The claims ledger as a pandas table: one row per claim and device, every column of the HTML ledger
plus the environment it was measured in. ``python -m harness report --csv`` writes it; ``compare``
joins two of them.

pandas is imported here only (the ``bench`` and ``test`` dependency groups install it), so the rest of
the harness runs without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness.bench import FORMAT
from harness.report import bound_text, rejudge

ENV_KEYS = ("cpu_model", "cores", "threads", "device_kind", "torch", "python", "triton", "platform")
KEY = ["project", "slug", "claim", "device"]
COLUMNS = [*KEY, "title", "phase", "seed", "metric", "unit", "bound", "bound_min", "bound_max", "guard",
           "guard_min", "guard_max", "value", "spread_lo", "spread_hi", "verdict", "guard_crossed", "flagged",
           "mode", "commit", "run_id", "measured_at", "seconds", "na_reason", "error",
           *(f"env_{k}" for k in ENV_KEYS)]


class LedgerFileError(ValueError):
    """A file that is not a results file of this harness, or one of an incompatible schema version."""


def read_results(path: str | Path) -> dict[str, Any]:
    """A results file (``reports/out/results.json`` of any machine or commit), checked: one clear
    ``LedgerFileError`` line for a missing file, bad JSON, another format, or another schema version."""
    from harness.bench import validate_results

    path = Path(path)
    if not path.is_file():
        raise LedgerFileError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LedgerFileError(f"{path}: not valid JSON ({e.__class__.__name__}: {e})") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    name, _, version = str(fmt).rpartition("/")
    if fmt is None or name != FORMAT.rpartition("/")[0]:
        raise LedgerFileError(f"{path}: unknown format {fmt!r}: not a results file of this harness "
                              f"(expected {FORMAT!r}, written by `python -m harness bench`)")
    if version != FORMAT.rpartition("/")[2]:
        raise LedgerFileError(f"{path}: results schema version {version} is incompatible with this harness's "
                              f"{FORMAT.rpartition('/')[2]}: re-measure with this checkout's `python -m harness bench`")
    problem = validate_results(data)
    if problem:
        raise LedgerFileError(f"{path}: {problem}")
    return data


def _limit(table: dict[str, float] | None, side: str) -> float | None:
    return None if not table else table.get(side)


def ledger_frame(results: dict[str, Any], measured_only: bool = False) -> pd.DataFrame:
    """Every claim row of ``results`` (re-judged by the current specs, like the HTML ledger) as a
    DataFrame with ``COLUMNS``; ``measured_only`` drops planned and never-measured rows."""
    rows = []
    for p in rejudge(results)["projects"]:
        env = p.get("environment") or {}
        for c in p["claims"]:
            if measured_only and c["verdict"] in ("planned", "not run") and c.get("value") is None:
                continue
            spread = c.get("spread") or (None, None)
            rows.append({
                "project": p["project"], "slug": p["slug"], "claim": c["name"], "device": c.get("device", ""),
                "title": p["title"], "phase": p["phase"], "seed": c.get("seed", ""), "metric": c.get("metric", ""),
                "unit": c.get("unit", ""), "bound": bound_text(c["bound"]),
                "bound_min": _limit(c["bound"], "min"), "bound_max": _limit(c["bound"], "max"),
                "guard": bound_text(c["guard"]) if c.get("guard") else "",
                "guard_min": _limit(c.get("guard"), "min"), "guard_max": _limit(c.get("guard"), "max"),
                "value": c.get("value"), "spread_lo": spread[0], "spread_hi": spread[1],
                "verdict": c["verdict"], "guard_crossed": bool(c.get("guard_crossed")),
                "flagged": bool(c.get("flagged")), "mode": c.get("mode", ""), "commit": c.get("commit", ""),
                "run_id": c.get("run_id", ""), "measured_at": c.get("measured_at", ""),
                "seconds": c.get("seconds"), "na_reason": c.get("na_reason", "") or "",
                "error": str(c.get("error", "") or "").strip().splitlines()[-1:][0] if c.get("error") else "",
                **{f"env_{k}": env.get(k, "") for k in ENV_KEYS},
            })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("value", "spread_lo", "spread_hi", "bound_min", "bound_max", "guard_min", "guard_max", "seconds"):
        frame[col] = pd.to_numeric(frame[col])
    return frame


def write_csv(results: dict[str, Any], path: str | Path) -> int:
    """Write the ledger of ``results`` as CSV to ``path`` ("-": stdout); returns the number of rows."""
    import sys

    frame = ledger_frame(results)
    frame.to_csv(sys.stdout if str(path) == "-" else path, index=False)
    return len(frame)
