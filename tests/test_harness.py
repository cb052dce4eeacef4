"""The engine itself: spec validation errors, verdicts, measurement helpers, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import bench, report
from harness.checks import CheckFailed, run_case
from harness.measure import Image, MeasurementError, Result, interleaved, peak_memory_bytes, quartiles
from harness.spec import Check, SpecError, load_spec, load_specs

GOOD = """
project = 8
slug = "kv_cache"
title = "KV-Cache"
phase = "Phase 3"
status = "implemented"
seed_outcome = "10-30x faster text generation."
builds = ["KV-Cache from scratch"]

[implementations]
naive = "impl.kv_cache.naive:greedy"
fast = "impl.kv_cache.fast:greedy"

[[check]]
name = "greedy tokens identical"
kind = "exact"
compare = ["naive", "fast"]
cases = "tests.cases.kv_cache:prompts"
mutants = ["tests.mutants.kv_cache:stale_cache"]

[[claim]]
name = "speedup"
seed = "10-30x"
metric = "speedup"
bound = { min = 10 }
workload = "benchmarks.workloads.kv_cache:speedup_512"
devices = ["cpu"]
"""


def write(tmp_path: Path, text: str, name: str = "08_kv_cache.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_spec_in_the_repository_loads():
    specs = load_specs()
    assert [s.project for s in specs] == list(range(1, 31)), "one spec per roadmap project, 1..30"


def test_a_good_spec_loads(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.checks[0].subject == "fast" and spec.claims[0].bound == {"min": 10.0}


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (lambda s: s.replace('title = "KV-Cache"\n', ""), "title", "missing required key"),
        (lambda s: s.replace("bound = { min = 10 }", 'bound = { min = "ten" }'), "claim[0].bound.min",
         "must be float"),
        (lambda s: s.replace("project = 8", 'project = "8"'), "project", "must be int"),
        (lambda s: s.replace("impl.kv_cache.fast:greedy", "impl.kv_cache.fast:no_such_thing"),
         "implementations.fast", "cannot resolve"),
        (lambda s: s.replace("impl.kv_cache.fast:greedy", "impl.kv_cache.fast"), "implementations.fast",
         "must be 'module:callable'"),
        (lambda s: s.replace('kind = "exact"', 'kind = "roughly"'), "check[0].kind", "must be one of"),
        (lambda s: s.replace('mutants = ["tests.mutants.kv_cache:stale_cache"]', "mutants = []"),
         "check[0].mutants", "at least one mutant"),
        (lambda s: s.replace('compare = ["naive", "fast"]', 'compare = ["naive", "fastest"]'),
         "check[0].compare[1]", "not in [implementations]"),
        (lambda s: s.replace('devices = ["cpu"]', 'devices = ["tpu"]'), "claim[0].devices[0]", "must be one of"),
        (lambda s: s.replace("project = 8", "project = 9"), "project", "file name says 8"),
        (lambda s: s.replace("devices = [\"cpu\"]", "devices = [\"cpu\"]\ngate = true"), "claim[0].gate",
         "was replaced by `guard"),
        (lambda s: s.replace("devices = [\"cpu\"]", "devices = [\"cpu\"]\nguard = { min = 3, max = 2 }"),
         "claim[0].guard", "is above max"),
        (lambda s: s.replace("devices = [\"cpu\"]", "devices = [\"cpu\"]\ntimeout_s = 0"), "claim[0].timeout_s",
         "must be > 0"),
    ],
    ids=["missing-key", "wrong-type-bound", "wrong-type-project", "unknown-callable", "not-a-target",
         "bad-check-kind", "no-mutants", "unknown-compare", "bad-device", "number-mismatch", "old-gate-key",
         "inverted-guard", "zero-timeout"],
)
def test_a_bad_spec_gives_one_line_naming_file_and_key(tmp_path, change, key, problem):
    path = write(tmp_path, change(GOOD))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"spec {path.as_posix()}: {key}: ")
    assert problem in message


def test_the_cli_reports_a_bad_spec_in_one_line(tmp_path):
    bad = write(tmp_path, GOOD.replace("bound = { min = 10 }", 'bound = { min = "ten" }'))
    code = (
        "import sys, harness.spec as s; s.SPECS_DIR = s.Path(sys.argv[1]);"
        "from harness.__main__ import main; sys.exit(main(['list']))"
    )
    # list does not import callables: it still validates types
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: spec {bad.as_posix()}: claim[0].bound.min: "
                                  "must be float, got str 'ten'")


def test_verdicts_follow_the_bound():
    assert bench.judge(12.0, {"min": 10}) == "holds"
    assert bench.judge(9.99, {"min": 10}) == "fails"
    assert bench.judge(1.0, {"min": 1, "max": 1}) == "holds"
    assert bench.judge(float("nan"), {"max": 1}) == "fails"


def test_a_too_good_speedup_is_flagged():
    from harness.spec import Claim

    claim = Claim("x", "2-4x faster attention", "speedup", {"min": 2}, ["cpu"])
    assert bench.too_good(claim, 100.0) and not bench.too_good(claim, 5.0)
    assert bench.verdict_of(claim, 100.0) == ("review", True)
    year = Claim("x", "FlashAttention-2 (Dao, 2023)", "speedup", {"min": 2}, ["cpu"])
    assert not bench.too_good(year, 5000.0)  # a year is not a seed figure


def test_every_implemented_claim_has_a_guard_or_says_why_not():
    missing = [f"{s.path.name}: {c.name}" for s in load_specs(check_import=False) if s.implemented
               for c in s.claims if c.guard is None and not c.unguarded]
    assert not missing, "claims without a guard or an `unguarded` reason:\n" + "\n".join(missing)


def test_seed_texts_are_the_roadmaps_words():
    """A claim's seed quotes its project's outcome or one of its build items; figures from papers go in the note."""
    loose = [f"{s.path.name}: '{c.name}': {c.seed!r}" for s in load_specs(check_import=False) for c in s.claims
             if not any(c.seed.rstrip(".").lower() in text.lower() for text in [s.seed_outcome, *s.builds])]
    assert not loose, "seeds that are not the roadmap's words:\n" + "\n".join(loose)


def test_allclose_rejects_a_wrong_output_and_accepts_a_right_one():
    import torch

    check = Check("same", "allclose", ["a", "b"], "x:y", ["x:y"], "b", oracle="a", baseline="a")
    case = {"x": torch.randn(5)}
    run_case(check, {"a": lambda x: x * 2, "b": lambda x: x + x}, case)
    with pytest.raises(CheckFailed, match="max error"):
        run_case(check, {"a": lambda x: x * 2, "b": lambda x: x * 2 + 1e-3}, case)


def test_low_precision_rule_compares_against_the_baseline_error():
    import torch

    check = Check("same", "allclose", ["a", "b"], "x:y", ["x:y"], "b", oracle="a", baseline="a", k=2, floor=0)
    case = {"x": torch.randn(64), "dtype": torch.bfloat16}
    exact = lambda x: x.float() * 3
    run_case(check, {"a": exact, "b": exact}, case)
    with pytest.raises(CheckFailed, match="exceeds"):
        run_case(check, {"a": lambda x: (x * 3).to(torch.bfloat16), "b": lambda x: x.float() * 3 + 0.5}, case)


def test_low_precision_rule_needs_a_finite_yardstick():
    import torch

    check = Check("same", "allclose", ["a", "b"], "x:y", ["x:y"], "b", oracle="a", baseline="a", k=2, floor=0)
    case = {"x": torch.randn(64), "dtype": torch.bfloat16}
    overflowing = lambda x: x.float() * 3 if x.dtype == torch.float64 else torch.full_like(x, float("inf"))
    with pytest.raises(CheckFailed, match="finite yardstick"):  # k * inf would pass any b
        run_case(check, {"a": overflowing, "b": lambda x: x.float() * 3 + 100}, case)
    far = lambda x: x.double() * 3 if x.dtype == torch.float64 else x.float() * 3 + 5  # wrong, not imprecise
    with pytest.raises(CheckFailed, match="baseline a"):
        run_case(check, {"a": far, "b": lambda x: x.float() * 3 + 7}, case)


def test_degenerate_measurements_are_errors_not_figures():
    from harness.measure import MeasurementError, require_positive

    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(MeasurementError, match="degenerate"):
            require_positive("peak", bad)
    assert require_positive("peak", 3) == 3


def test_the_nightly_hypothesis_profile_is_random_and_larger(monkeypatch):
    from harness.checks import hypothesis_settings

    check = Check("same", "exact", ["a", "b"], "x:y", ["x:y"], "b", examples=7)
    assert hypothesis_settings(check).derandomize and hypothesis_settings(check).max_examples == 7
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "nightly")
    nightly = hypothesis_settings(check)
    assert not nightly.derandomize and nightly.max_examples == 70
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "weekly")
    with pytest.raises(ValueError, match="HYPOTHESIS_PROFILE='weekly'"):
        hypothesis_settings(check)


def test_interleaved_timing_gives_one_entry_per_round():
    timings = interleaved({"a": lambda: sum(range(1000)), "b": lambda: sum(range(10))}, rounds=4)
    assert all(len(v) == 4 for v in timings.seconds.values())
    ratio, (q1, q3) = timings.ratio("a", "b")
    assert q1 <= ratio <= q3 and ratio > 1


def test_quartiles_of_a_known_list():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)


def allocate(mib: int):
    import torch

    return lambda: torch.ones(mib * 2**20 // 4).sum()


def test_peak_memory_sees_a_torch_allocation():
    small = peak_memory_bytes("tests.test_harness:allocate", mib=1)
    big = peak_memory_bytes("tests.test_harness:allocate", mib=200)
    assert big - small > 150 * 2**20


def test_report_renders_every_project_and_its_plots(tmp_path):
    results = {"updated": "now", "projects": []}
    for spec in load_specs(check_import=False):
        claims = []
        for c in spec.claims:
            claims.append(bench.claim_row(c, "cpu", "quick") | {"verdict": "planned"})
        results["projects"].append(bench.project_entry(spec) | {"claims": claims})
    results["projects"][0]["claims"][0] |= {
        "verdict": "fails", "value": 1.9, "spread": [1.8, 2.0],
        "plots": [{"title": "t", "x": [1, 2], "series": {"a": [1, 2]}, "xlabel": "", "ylabel": ""}]}
    results["projects"][0]["claims"][0] |= {"commit": "0123456789abcdef"}
    index = report.render(json.loads(json.dumps(results)), tmp_path)
    html = index.read_text()
    assert html.count("<tr>") >= 30 + 1 and "fails" in html
    assert "quick &middot; <code>01234567</code>" in html  # every row shows its mode and commit
    assert len(list(tmp_path.glob("*.html"))) == 31
    assert list((tmp_path / "img").glob("*.png"))


def test_results_carry_images_and_the_report_shows_them(tmp_path):
    """A screenshot a workload takes travels in results.json (base64) and lands on the project page as a file
    with the same bytes."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.figure(figsize=(1, 1)).savefig(buf, format="png")
    plt.close("all")
    png = buf.getvalue()
    row = Result(1.0, images=[Image.from_png("chat in Chromium", png)]).to_json()
    spec = next(s for s in load_specs(check_import=False) if s.claims)
    claim = bench.claim_row(spec.claims[0], "cpu", "quick") | {"verdict": "holds"} | json.loads(json.dumps(row))
    results = {"updated": "now", "projects": [bench.project_entry(spec) | {"claims": [claim]}]}
    report.render(results, tmp_path)
    shots = list((tmp_path / "img").glob("*-shot0.png"))
    assert len(shots) == 1 and shots[0].read_bytes() == png
    page = (tmp_path / f"{spec.project:02d}_{spec.slug}.html").read_text()
    assert f'src="img/{shots[0].name}"' in page and "chat in Chromium" in page
    with pytest.raises(MeasurementError, match="not PNG"):
        Image.from_png("an error page", b"<html>500</html>")
