"""`python -m harness compare A B` and `report --csv`: two results files made here from fixed figures,
joined, flagged and exported exactly as expected; malformed files refused in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness import bench
from harness.compare import compare
from harness.ledger import COLUMNS, LedgerFileError, ledger_frame, read_results
from harness.report import margin
from harness.spec import SPECS_DIR, load_spec

ROOT = Path(__file__).resolve().parent.parent
KV = load_spec(SPECS_DIR / "08_kv_cache.toml", check_import=False)
SPEEDUP, GROWTH, TOKS, PEAK = (next(c for c in KV.claims if c.name == n) for n in (
    "generation speedup at 512 new tokens", "the cache's speedup grows with length at least as much as HF's",
    "tokens/s against HF generate", "peak memory of a cached generation is the cache formula"))


def results_file(path: Path, figures: dict, commit: str, mode: str) -> Path:
    """A results file as `harness bench` writes it, with the kv_cache claims measured at ``figures``
    ([(claim, value, spread or None)]); verdicts are recomputed from the spec, as the harness does."""
    rows = []
    for claim, value, spread in figures:
        verdict, flagged = bench.verdict_of(claim, value)
        rows.append(bench.claim_row(claim, "cpu", mode) | {
            "value": value, "spread": spread, "verdict": verdict, "flagged": flagged, "commit": commit,
            "guard_crossed": bench.guard_crossed(value, claim.guard), "run_id": "r-" + commit[:4],
            "measured_at": "2026-12-02T00:00:00Z"})
    env = {"cpu_model": "Test CPU " + commit[:4], "cores": 2, "threads": 2, "torch": "2.13.0+cpu",
           "device": "cpu", "device_kind": "cpu", "python": "3.11", "date": "2026-12-02T00:00:00Z", "mode": mode}
    data = {"format": bench.FORMAT, "updated": "2026-12-02T00:00:00Z",
            "run": {"id": "r-" + commit[:4], "commit": commit, "mode": mode, "total": len(rows), "done": len(rows),
                    "complete": True, "interrupted": None},
            "projects": [bench.project_entry(KV) | {"claims": rows, "environment": env,
                                                    "spec_sha": bench.spec_sha(KV)}]}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def two_runs(tmp_path):
    a = results_file(tmp_path / "a.json", [
        (SPEEDUP, 12.0, [11.0, 13.0]),  # holds; B's 12.5 sits inside both spreads: no flag
        (GROWTH, 1.2, None),            # holds; B 0.9 fails: flipped (and beyond both spreads: 0)
        (TOKS, 1.5, [1.45, 1.55]),      # above the guard 1.3; B 1.25 crosses it (bound 1 still holds)
    ], "aaaaaaaaaaaa", "quick")
    b = results_file(tmp_path / "b.json", [
        (SPEEDUP, 12.5, [12.0, 13.0]), (GROWTH, 0.9, None), (TOKS, 1.25, [1.2, 1.3]),
        (PEAK, 1.1, None),              # only in B
    ], "bbbbbbbbbbbb", "full")
    return a, b


def test_compare_joins_ratios_and_flags_exactly(two_runs, tmp_path):
    md, page, joined = compare(*two_runs, tmp_path / "out")
    rows = {r["claim"]: r for _, r in joined.iterrows()}
    assert set(rows) == {SPEEDUP.name, GROWTH.name, TOKS.name, PEAK.name}
    assert rows[SPEEDUP.name]["ratio"] == pytest.approx(12.5 / 12.0) and rows[SPEEDUP.name]["flags"] == []
    assert rows[GROWTH.name]["ratio"] == pytest.approx(0.75)
    assert rows[GROWTH.name]["flags"] == ["flipped", "spread"]
    assert (rows[GROWTH.name]["verdict_a"], rows[GROWTH.name]["verdict_b"]) == ("holds", "fails")
    assert rows[TOKS.name]["flags"] == ["guard", "spread"]  # 0.25 apart, spreads 0.1 wide
    assert (rows[TOKS.name]["verdict_a"], rows[TOKS.name]["verdict_b"]) == ("holds", "holds")
    assert rows[PEAK.name]["verdict_a"] == "absent" and math.isnan(rows[PEAK.name]["ratio"])
    assert rows[PEAK.name]["flags"] == ["one side"]
    # the environments side by side, the flags in words, both files' pages written
    assert "| commit | aaaaaaaaaa | bbbbbbbbbb |" in md and "| mode | quick | full |" in md
    assert "| cpu_model | Test CPU aaaa | Test CPU bbbb |" in md
    assert f"| {GROWTH.name} | cpu |" in md and "verdict flipped, beyond both spreads" in md
    assert "guard crossed" in page.read_text() and (tmp_path / "out" / "compare.md").read_text().strip() == md


def test_compare_cli_prints_the_table_and_names_a_malformed_file_in_one_line(two_runs, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "harness", "compare", *map(str, two_runs), "--out", str(tmp_path)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "3 of 4 rows flagged" in ok.stdout and (tmp_path / "compare.html").is_file()
    bad = tmp_path / "bad.json"
    for text, problem in [("{not json", "not valid JSON"), ('{"projects": []}', "unknown format None"),
                          ('{"format": "handson-llm-results/1", "projects": []}', "schema version 1 is incompatible"),
                          ('{"format": "other-tool/2"}', "unknown format 'other-tool/2'")]:
        bad.write_text(text)
        out = subprocess.run([sys.executable, "-m", "harness", "compare", str(two_runs[0]), str(bad)],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0] and str(bad) in lines[0], out.stderr
    with pytest.raises(LedgerFileError, match="no such file"):
        read_results(tmp_path / "missing.json")


def test_the_csv_ledger_round_trips_through_pandas(two_runs, tmp_path):
    results = read_results(two_runs[1])
    ledger = ledger_frame(results)
    path = tmp_path / "ledger.csv"
    (tmp_path / "results.json").write_text(two_runs[1].read_text())
    out = subprocess.run([sys.executable, "-m", "harness", "report", "--csv", str(path)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "HANDSON_REPORT_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ledger: {path} ({len(ledger)} rows)"
    back = pd.read_csv(path)
    assert list(back.columns) == COLUMNS and len(back) == len(ledger)
    # every claim of every spec is a row (planned ones too), as in the HTML ledger
    assert len(back) == sum(len(load_spec(p, check_import=False).claims) for p in sorted(SPECS_DIR.glob("*.toml")))
    kv = back[back["slug"] == "kv_cache"].set_index("claim")
    assert kv.loc[TOKS.name, "value"] == 1.25 and kv.loc[TOKS.name, "guard_crossed"]
    assert kv.loc[SPEEDUP.name, "spread_lo"] == 12.0 and kv.loc[SPEEDUP.name, "env_cpu_model"] == "Test CPU bbbb"
    assert kv.loc[GROWTH.name, "verdict"] == "fails" and kv.loc[GROWTH.name, "mode"] == "full"


@pytest.mark.parametrize(("value", "bound", "expected"), [
    (12.0, {"min": 10}, 1.2), (0.5, {"max": 0.25}, 0.5), (1.0, {"min": 0.9, "max": 1.25}, 1.1111111111111112),
    (-0.01, {"max": 0}, None), (0.3, {"min": 0}, None)])
def test_the_index_plot_orients_every_bound_so_right_of_one_meets_it(value, bound, expected):
    assert margin(value, bound) == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize(("a", "b", "iqr_a", "expected"), [
    (1.100, 1.104, None, []),                   # measured once: within +-1%, no flag
    (1.100, 1.130, None, ["spread"]),           # 2.7% apart: beyond the 1% band of both
    (1.100, 1.130, (1.0, 1.2), []),             # inside A's IQR
    (-0.010, 0.002, None, ["spread"]),          # a signed delta crossing 0
])
def test_a_change_is_flagged_only_beyond_each_runs_spread(a, b, iqr_a, expected):
    from harness.compare import flags

    lo, hi = iqr_a or (math.nan, math.nan)
    row = pd.Series({"verdict_a": "holds", "verdict_b": "holds", "guard_crossed_a": False, "guard_crossed_b": False,
                     "value_a": a, "value_b": b, "spread_lo_a": lo, "spread_hi_a": hi, "spread_lo_b": math.nan,
                     "spread_hi_b": math.nan})
    assert flags(row) == expected
