"""The bench as a user runs it, with real faults: devices, verdicts (review, error, n/a, not run),
guards and the gate, hangs and killed workers, interruptions by signals, --resume, bad results files,
and the report re-judging stored figures against the current specs.

Each test writes its own specs into a temp folder; the workloads are in tests/bench_workloads.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import bench, report
from harness.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent

SPEC_HEAD = """
project = {project}
slug = "{slug}"
title = "Test project {project}"
phase = "Tests"
status = "implemented"
seed_outcome = "2-4x faster."
builds = ["a test"]

[implementations]
naive = "impl.kv_cache.naive:greedy"
fast = "impl.kv_cache.fast:greedy"

[[check]]
name = "greedy tokens identical"
kind = "exact"
compare = ["naive", "fast"]
cases = "tests.cases.kv_cache:prompts"
mutants = ["tests.mutants.kv_cache:stale_cache"]
"""


def claim(name: str, workload: str, bound: str = "{ min = 1 }", devices: str = '["cpu"]', seed: str = "2-4x faster",
          extra: str = "") -> str:
    return (f'\n[[claim]]\nname = "{name}"\nseed = "{seed}"\nmetric = "speedup"\nbound = {bound}\n'
            f'workload = "tests.bench_workloads:{workload}"\ndevices = {devices}\n{extra}\n')


def write_spec(folder: Path, claims: list[str], project: int = 1, slug: str = "alpha") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{project:02d}_{slug}.toml"
    path.write_text(SPEC_HEAD.format(project=project, slug=slug) + "".join(claims))
    return path


@pytest.fixture
def out(tmp_path, monkeypatch):
    """Results and report in a temp folder."""
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "out" / "results.json")
    monkeypatch.setattr(report, "OUT_DIR", tmp_path / "out")
    return tmp_path / "out"


def rows(results: dict) -> dict[tuple[str, str], dict]:
    return {(c["name"], c["device"]): c for p in results["projects"] for c in p["claims"]}


def test_a_gpu_host_still_measures_cpu_claims_on_the_cpu(tmp_path, out, monkeypatch):
    log = tmp_path / "devices.log"
    monkeypatch.setenv("BENCH_TEST_LOG", str(log))
    spec = load_spec(write_spec(tmp_path / "specs", [
        claim("cpu only", "record_device", devices='["cpu"]'),
        claim("both", "record_device", devices='["cpu", "cuda"]'),
        claim("cuda only", "record_device", devices='["cuda"]'),
    ]))
    results = bench.run([spec], progress=False, isolate=False, have=["cpu", "cuda"])  # CUDA faked present
    got = rows(results)
    assert set(got) == {("cpu only", "cpu"), ("both", "cpu"), ("both", "cuda"), ("cuda only", "cuda")}
    assert all(r["verdict"] == "holds" for r in got.values())
    assert sorted(log.read_text().split()) == ["cpu", "cpu", "cuda", "cuda"]  # each workload got its device


def test_device_option_restricts_the_run_and_a_missing_device_is_na(tmp_path, out, monkeypatch):
    monkeypatch.setenv("BENCH_TEST_LOG", str(tmp_path / "devices.log"))
    spec = load_spec(write_spec(tmp_path / "specs", [
        claim("both", "record_device", devices='["cpu", "cuda"]'),
        claim("cuda only", "record_device", devices='["cuda"]'),
    ]))
    got = rows(bench.run([spec], progress=False, isolate=False, have=["cpu", "cuda"], devices=["cuda"]))
    assert set(got) == {("both", "cuda"), ("cuda only", "cuda")}
    got = rows(bench.run([spec], progress=False, isolate=False, have=["cpu"]))
    assert got[("cuda only", "cuda")]["verdict"] == "n/a" and "needs cuda" in got[("cuda only", "cuda")]["na_reason"]


def test_seed_figures_are_factors_not_years():
    assert bench.seed_figures("FlashAttention-2 (2023): 2-4x faster, 50% less, 10x in 2024") == [2.0, 4.0, 10.0]
    assert bench.seed_figures("Dao et al., 2023") == []


def test_a_too_good_figure_is_a_review_verdict_that_fails_the_gate_until_explained(tmp_path, out):
    folder = tmp_path / "specs"
    spec = load_spec(write_spec(folder, [claim("huge", "five_hundred", extra="guard = { min = 1 }")]))
    results = bench.run([spec], progress=False, isolate=False)
    assert rows(results)[("huge", "cpu")]["verdict"] == "review"
    assert any("review_note" in line for line in bench.gate_failures(results, {"alpha"}))
    spec = load_spec(write_spec(folder, [claim("huge", "five_hundred",
                                               extra='guard = { min = 1 }\nreview_note = "a cache hit"')]))
    results = bench.run([spec], progress=False, isolate=False)
    row = rows(results)[("huge", "cpu")]
    assert row["verdict"] == "holds" and row["flagged"] and not bench.gate_failures(results, {"alpha"})


def test_the_gate_follows_the_guard_not_the_bound(tmp_path, out):
    spec = load_spec(write_spec(tmp_path / "specs", [
        claim("fails but above its floor", "five", bound="{ min = 10 }", extra="guard = { min = 4 }"),
        claim("crosses its floor", "five", bound="{ min = 1 }", extra="guard = { min = 6 }"),
    ]))
    results = bench.run([spec], progress=False, isolate=False)
    got = rows(results)
    assert got[("fails but above its floor", "cpu")]["verdict"] == "fails"
    assert got[("fails but above its floor", "cpu")]["guard_crossed"] is False
    assert got[("crosses its floor", "cpu")]["verdict"] == "holds"
    failures = bench.gate_failures(results, {"alpha"})
    assert len(failures) == 1 and "crosses its floor" in failures[0] and "guard" in failures[0]


def test_degenerate_figures_and_absent_components(tmp_path, out):
    spec = load_spec(write_spec(tmp_path / "specs", [
        claim("nan", "not_a_number"),
        claim("zero peak", "zero_peak"),
        claim("absent", "absent_component"),
        claim("full size only", "five", extra="quick = false"),
    ]))
    got = rows(bench.run([spec], quick=True, progress=False, isolate=False))
    assert got[("nan", "cpu")]["verdict"] == "error" and "degenerate" in got[("nan", "cpu")]["error"]
    assert got[("zero peak", "cpu")]["verdict"] == "error" and "degenerate" in got[("zero peak", "cpu")]["error"]
    assert got[("absent", "cpu")]["verdict"] == "n/a"
    assert got[("absent", "cpu")]["na_reason"] == "no container engine on this machine"
    assert got[("full size only", "cpu")]["verdict"] == "not run"
    assert got[("full size only", "cpu")]["mode"] == "quick"


def test_a_hung_claim_and_killed_workers_become_error_rows_and_the_bench_goes_on(tmp_path, out):
    spec = load_spec(write_spec(tmp_path / "specs", [
        claim("hangs", "hangs", extra="timeout_s = 4"),
        claim("killed", "kills_its_process"),
        claim("memory worker killed", "memory_worker_killed"),
        claim("after the faults", "five"),
        claim("starts ranks", "spawns_ranks"),
    ]))
    got = rows(bench.run([spec], progress=False))  # isolated: each in a worker process
    assert got[("hangs", "cpu")]["verdict"] == "error" and "timed out after 4 s" in got[("hangs", "cpu")]["error"]
    assert got[("killed", "cpu")]["verdict"] == "error" and "SIGKILL" in got[("killed", "cpu")]["error"]
    memory = got[("memory worker killed", "cpu")]
    assert memory["verdict"] == "error" and "killed by SIGKILL" in memory["error"]
    assert got[("after the faults", "cpu")]["verdict"] == "holds"
    assert got[("starts ranks", "cpu")]["value"] == 5.0  # a worker may start processes (multi-rank claims)


def run_cli(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = dict(os.environ, HANDSON_SPECS_DIR=str(tmp_path / "specs"), HANDSON_REPORT_DIR=str(tmp_path / "out"),
                    **(env or {}))
    # a terminal's bench: SIGINT at its default even when pytest itself runs as a background job
    # (a non-interactive shell starts those with SIGINT ignored, and Python keeps an ignored SIGINT)
    return subprocess.Popen([sys.executable, "-m", "harness", "bench", "--no-progress", *args], cwd=ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_default)


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_rows(results: Path, n: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if results.is_file():
            data = json.loads(results.read_text())
            if data.get("run", {}).get("done", 0) >= n:
                return data
        time.sleep(0.2)
    raise AssertionError(f"{results} never reached {n} rows")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_bench_keeps_finished_rows_and_resume_finishes_it(tmp_path, sig):
    write_spec(tmp_path / "specs", [claim(f"slow {i}", "slow_one_second") for i in range(5)])
    results = tmp_path / "out" / "results.json"
    proc = run_cli(tmp_path)
    wait_for_rows(results, 2)
    os.killpg(proc.pid, sig)  # the whole process group, as a terminal's Ctrl-C does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), stderr
    data = json.loads(results.read_text())
    done = data["run"]["done"]
    assert 2 <= done < 5 and data["run"]["interrupted"] == f"interrupted after {done} of 5 claims"
    assert sum(c["verdict"] == "holds" for c in data["projects"][0]["claims"]) == done
    assert f"interrupted after {done} of 5 claims" in (tmp_path / "out" / "index.html").read_text()

    log = tmp_path / "measured.log"
    resumed = run_cli(tmp_path, "--resume", env={"BENCH_TEST_LOG": str(log)})
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert f"{done} of 5 claims already measured, skipped" in stderr
    assert len(log.read_text().split()) == 5 - done  # only the missing claims were measured
    data = json.loads(results.read_text())
    assert data["run"]["complete"] and data["run"]["done"] == 5
    assert [c["verdict"] for c in data["projects"][0]["claims"]] == ["holds"] * 5
    assert "interrupted" not in (tmp_path / "out" / "index.html").read_text()


def test_resume_refuses_a_run_of_another_mode(tmp_path):
    write_spec(tmp_path / "specs", [claim(f"slow {i}", "slow_one_second") for i in range(3)])
    proc = run_cli(tmp_path)
    wait_for_rows(tmp_path / "out" / "results.json", 1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    resumed = run_cli(tmp_path, "--resume", "--quick")
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 2
    assert "full mode; this is" in stderr and "quick mode" in stderr and len(stderr.strip().splitlines()) == 1


def test_a_truncated_results_file_is_named_moved_aside_and_a_fresh_one_started(tmp_path):
    write_spec(tmp_path / "specs", [claim("five", "five")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"projects": [{"slug": 1}')
    env = dict(os.environ, HANDSON_SPECS_DIR=str(tmp_path / "specs"), HANDSON_REPORT_DIR=str(out))
    rep = subprocess.run([sys.executable, "-m", "harness", "report"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert rep.returncode == 2
    assert rep.stderr.strip().startswith(f"error: {out / 'results.json'}: not valid JSON")
    assert len(rep.stderr.strip().splitlines()) == 1
    proc = run_cli(tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    aside = list(out.glob("results.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"projects": [{"slug": 1}'  # kept, never overwritten
    assert "moved aside" in stderr
    assert json.loads((out / "results.json").read_text())["run"]["complete"]


def test_a_foreign_json_file_is_refused_by_name():
    assert bench.validate_results({"rows": []}) == "no 'projects' list: not a results file of this harness"
    assert "lacks a 'name'" in bench.validate_results({"projects": [{"slug": "a", "claims": [{}]}]})


def test_the_report_rejudges_stored_figures_against_the_current_spec(tmp_path, out):
    folder = tmp_path / "specs"
    spec = load_spec(write_spec(folder, [claim("five", "five", bound="{ min = 10 }", extra="guard = { min = 4 }")]))
    results = bench.run([spec], progress=False, isolate=False)
    assert rows(results)[("five", "cpu")]["verdict"] == "fails"
    spec = load_spec(write_spec(folder, [claim("five", "five", bound="{ min = 3 }", extra="guard = { min = 6 }")]))
    again = report.rejudge(results, [spec])
    row = rows(again)[("five", "cpu")]
    assert row["verdict"] == "holds" and row["guard_crossed"] and row["bound"] == {"min": 3.0}
    assert again["projects"][0]["spec_changed"]
    assert "measured against bound >= 10" in row["rejudged"]


def test_check_outcomes_count_only_for_the_commit_they_ran_on(tmp_path):
    xml = tmp_path / "checks.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest"><properties><property name="commit" value="abc"/></properties>'
        '<testcase name="test_edge_case[alpha/check/edge:0]"/>'
        '<testcase name="test_mutant_is_rejected[alpha/check/mutant:m]"><failure message="survived"/></testcase>'
        '</testsuite></testsuites>')
    same = report.check_outcomes(xml, commit="abc")
    assert same["per_slug"]["alpha"] == {"passed": 1, "failed": 1} and same["failed"] == {"alpha": 1}
    assert report.check_outcomes(xml, commit="def") == {"commit": "abc", "stale": True}
    failures = bench.gate_failures({"projects": []}, {"alpha"}, same)
    assert failures == ["alpha: 1 check(s) failed in the last test run of this commit"]
