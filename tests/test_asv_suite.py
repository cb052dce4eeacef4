"""The asv suite: asv collects the claims and nothing else, every figure is lower-is-better, and the
per-commit history lands where asv.conf.json and the README say."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.asv_suite.claims import benchmark_name, claims, direction
from harness import history
from harness.spec import load_specs

ROOT = Path(__file__).resolve().parent.parent
CONF = json.loads((ROOT / "asv.conf.json").read_text())
SUITE = ROOT / CONF["benchmark_dir"]

# asv's own discovery (asv_runner, installed with asv), run in a fresh interpreter as `asv run` does:
# the suite folder is imported as a top-level package, every module under it, every asv-named
# function and class method collected.
_DISCOVER = """
import json, sys
from asv_runner._aux import update_sys_path
from asv_runner.discovery import disc_benchmarks
update_sys_path(sys.argv[1])
print(json.dumps(sorted(b.name for b in disc_benchmarks(sys.argv[1]))))
"""


def discovered(suite: Path) -> list[str]:
    """Names asv collects from the benchmark folder ``suite`` (``module.function``)."""
    proc = subprocess.run([sys.executable, "-c", _DISCOVER, str(suite)], capture_output=True, text=True,
                          timeout=300, cwd=suite.parent)
    assert proc.returncode == 0, f"asv cannot discover {suite}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def expected_claims() -> set[str]:
    """The asv names of the claims the dashboard tracks, from the harness's own reading of the specs:
    implemented, measurable on the CPU, quick-mode capable and not ``asv = "none"``."""
    return {
        f"claims.{benchmark_name(spec.slug, claim.name)}"
        for spec in load_specs(check_import=False) if spec.implemented
        for claim in spec.claims
        if "cpu" in claim.devices and claim.asv != "none" and getattr(claim, "quick", True)
    }


def strays(suite: Path) -> list[str]:
    """Collected names that are not claims: what would make `asv run` call a workload without its ctx."""
    return sorted(set(discovered(suite)) - expected_claims())


def test_asv_collects_exactly_the_tracked_claims():
    names, claimed = set(discovered(SUITE)), expected_claims()
    assert not names - claimed, f"asv would run names that are not claims: {sorted(names - claimed)}"
    assert not claimed - names, f"claims missing from the dashboard: {sorted(claimed - names)}"


@pytest.mark.parametrize("stray", [
    "from benchmarks.workloads.sparse_attention import window_time_growth as time_exponent  # noqa: F401\n",
    "def peakmem_attention(ctx):\n    return ctx\n",
    "class TimeSuite:\n    def time_generate(self):\n        pass\n",
])
def test_stray_check_catches_a_function_named_like_an_asv_benchmark(tmp_path: Path, stray: str):
    copy = tmp_path / "benchmarks" / SUITE.name
    shutil.copytree(SUITE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "specs").symlink_to(ROOT / "specs")  # the suite reads ../../specs from its own file
    assert strays(copy) == []
    (copy / "stray.py").write_text(stray)
    found = strays(copy)
    assert len(found) == 1 and found[0].startswith("stray."), found


def test_benchmark_folder_holds_no_workloads():
    """asv imports everything under benchmark_dir; the workloads must live outside it."""
    workloads = (ROOT / "benchmarks" / "workloads").resolve()
    assert not workloads.is_relative_to(SUITE.resolve())


def better_records_lower(record, bound: dict[str, float], metric: str) -> None:
    """Raise AssertionError unless a value that meets the claim better is recorded lower."""
    if "min" in bound and "max" in bound:
        centre, half = (bound["min"] + bound["max"]) / 2, (bound["max"] - bound["min"]) / 2 or 0.1
        pairs = [(centre, centre + half), (centre, centre - half), (centre + half / 2, centre + 2 * half)]
    elif "min" in bound:
        b = bound["min"]
        if metric == "fraction":
            pairs = [(0.9, 0.5), (0.5, 0.1)]
        else:  # scaled around a positive bound, shifted around a signed one (a delta may be <= 0)
            pairs = [(b * 2, b), (b, b / 2)] if b > 0 else [(b + 1, b), (b, b - 1)]
    else:
        b = bound["max"]
        pairs = [(b / 2, b), (b, b * 2)] if b > 0 else [(b - 1, b), (b, b + 1)]
    for good, bad in pairs:
        assert record(good) < record(bad), f"{metric} {bound}: {good} is better than {bad} but records higher"


def test_every_tracked_claim_is_recorded_lower_is_better():
    specs = {benchmark_name(s.slug, c.name): c for s in load_specs(check_import=False) for c in s.claims}
    tracked = claims()
    assert tracked
    for claim in tracked:
        spec_claim = specs[claim["name"]]
        better_records_lower(claim["record"], spec_claim.bound, spec_claim.metric)
        assert "lower is better" in claim["unit"], claim


def test_a_claim_with_a_min_bound_is_recorded_as_its_inverse():
    record, unit = direction({"min": 10}, "speedup", "x")
    assert record(4.0) == 0.25 and unit == "1/(x), lower is better"
    record, unit = direction({"min": 0.8}, "fraction", "")
    assert record(0.9) == pytest.approx(0.1) and unit.startswith("1 - fraction")


def test_a_claim_with_a_max_bound_is_recorded_as_measured():
    record, unit = direction({"max": 1.88}, "loss", "nats")
    assert record(1.5) == 1.5 and unit == "nats, lower is better"


def test_a_band_claim_is_recorded_as_its_distance_from_the_centre():
    record, unit = direction({"min": 0.95, "max": 1.05}, "ratio", "x")
    assert record(1.02) == pytest.approx(0.02) and record(0.98) == pytest.approx(0.02)
    assert unit == "|x - 1|, lower is better"


@given(st.floats(0.01, 1e4), st.floats(1.01, 100))
def test_a_larger_speedup_always_records_lower(value: float, factor: float):
    record, _ = direction({"min": 2}, "speedup", "x")
    assert record(value * factor) < record(value)


def test_the_direction_check_rejects_a_min_claim_recorded_as_measured():
    with pytest.raises(AssertionError):
        better_records_lower(lambda v: v, {"min": 2.0}, "speedup")


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_a_degenerate_figure_cannot_be_recorded_as_its_inverse(value: float):
    record, _ = direction({"min": 2}, "speedup", "x")
    with pytest.raises(ValueError):
        record(value)


def _spec(slug: str, claims_toml: str, status: str = "implemented") -> str:
    return f'project = 1\nslug = "{slug}"\nstatus = "{status}"\n' + claims_toml


def _claim(name: str, extra: str = "", devices: str = '["cpu", "cuda"]') -> str:
    return (f'[[claim]]\nname = "{name}"\nmetric = "speedup"\nbound = {{ min = 2 }}\n'
            f'workload = "benchmarks.workloads.kv_cache:speedup_512"\ndevices = {devices}\n{extra}\n')


def test_suite_skips_cuda_only_full_size_only_untracked_and_planned_claims(tmp_path: Path):
    (tmp_path / "01_a.toml").write_text(_spec("a", _claim("kept") + _claim("gpu", devices='["cuda"]')
                                              + _claim("full", "quick = false") + _claim("none", 'asv = "none"')))
    (tmp_path / "02_b.toml").write_text(_spec("b", _claim("later"), status="planned"))
    assert [c["name"] for c in claims(tmp_path)] == ["track_a__kept"]


def test_asv_results_and_harness_results_are_kept_in_the_committed_history_folder():
    assert (ROOT / CONF["results_dir"]).resolve() == history.ASV_RESULTS_DIR
    assert history.HISTORY_DIR.relative_to(ROOT).as_posix() == "reports/history"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(history.RESULTS_DIR / "x.json")], cwd=ROOT)
    assert ignored.returncode == 1, "reports/history must not be git-ignored: it is the history a clone inherits"


def _results(*commits: str) -> dict:
    return {"projects": [{"project": i, "slug": f"p{i}", "claims": [], "environment": {"commit": c, "date": f"d{i}"}}
                         for i, c in enumerate(commits, 1)]}


def test_history_records_only_the_projects_measured_at_the_commit(tmp_path: Path):
    path = history.record(_results("abc", "old", "abc"), "abc", tmp_path)
    assert path == tmp_path / "abc.json"
    assert [p["slug"] for p in history.load("abc", tmp_path)["projects"]] == ["p1", "p3"]
    assert history.record(_results("old"), "new", tmp_path) is None
    assert not (tmp_path / "new.json").exists()
    assert history.record(_results("old"), "abc", tmp_path) is None  # nothing of abc: its file is kept
    assert [p["slug"] for p in history.load("abc", tmp_path)["projects"]] == ["p1", "p3"]


def test_history_merges_a_remeasured_project_into_the_commit_file(tmp_path: Path):
    history.record(_results("abc", "abc"), "abc", tmp_path)
    again = _results("abc")
    again["projects"][0]["claims"] = [{"name": "remeasured"}]
    history.record(again, "abc", tmp_path)
    projects = history.load("abc", tmp_path)["projects"]
    assert [p["slug"] for p in projects] == ["p1", "p2"] and projects[0]["claims"] == [{"name": "remeasured"}]
    assert history.commits(tmp_path) == ["abc"]


ASV_PREFIXES = ("time_", "timeraw_", "track_", "mem_", "peakmem_")


def asv_named(module) -> list[str]:
    """Public names of a workloads module that asv would collect as benchmarks."""
    return [name for name, obj in vars(module).items()
            if (callable(obj) and not isinstance(obj, type) and name.startswith(ASV_PREFIXES))
            or (isinstance(obj, type) and name.lower().startswith(tuple(p.rstrip("_") for p in ASV_PREFIXES)))]


def test_no_workload_is_named_like_an_asv_benchmark():
    """A workload named time_* would be called by asv without its ctx if it ever reached the suite."""
    import importlib
    import pkgutil

    import benchmarks.workloads as workloads

    bad = [f"{info.name}.{name}" for info in pkgutil.iter_modules(workloads.__path__)
           for name in asv_named(importlib.import_module(f"benchmarks.workloads.{info.name}"))]
    assert not bad, f"workload functions named like asv benchmarks (rename them): {bad}"


def test_the_workload_name_check_catches_an_asv_prefix():
    import types

    module = types.ModuleType("fake")
    module.time_exponent = lambda ctx: ctx
    module.window_time_growth = lambda ctx: ctx
    module.MEMORY_N = 4096
    module.TimeSuite = type("TimeSuite", (), {})
    assert asv_named(module) == ["time_exponent", "TimeSuite"]
