"""Run every ``[[claim]]`` under the measurement rules and give it a verdict.

A claim is measured on every device in its ``devices`` list that this machine has (the CPU
always), one row per (claim, device). Verdicts (DESIGN.md): holds, fails, review (too good to be
true and not explained by the spec), n/a (device or component absent), error (crashed, timed
out, degenerate), not run (a full-size claim in quick mode), planned.

Each project's claims run in a worker process, so a claim that hangs past its ``timeout_s`` or
kills its process (a segfault, the OOM killer) becomes an error row and the bench goes on with a
fresh worker. ``reports/out/results.json`` is rewritten atomically after every row, marked
incomplete until the run ends, so an interrupted run (Ctrl-C, SIGTERM, a killed job) keeps every
finished row and ``--resume`` continues it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import signal
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.measure import Context, NotApplicable, Result, environment, exit_reason
from harness.spec import Claim, Spec, load_spec, resolve

# where results.json and the report go: reports/out, or $HANDSON_REPORT_DIR
OUT_DIR = Path(os.environ.get("HANDSON_REPORT_DIR") or Path(__file__).resolve().parent.parent / "reports" / "out")
RESULTS = OUT_DIR / "results.json"
FORMAT = "handson-llm-results/2"
SUSPICIOUS_FACTOR = 10  # a figure 10x beyond the seed's largest is too good to be true: review
WORKER_START_S = 300  # a worker that does not start its first claim within this is an error
# the roadmap's figures: "2-4x", "10x", "10-30x", "50%" (a year such as "2023" is not a figure)
SEED_FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s*[-–]\s*(\d+(?:\.\d+)?))?\s*(x|×|%)(?!\w)")


class ResultsFileError(ValueError):
    """results.json cannot be read as a results file; the message is one line naming file and problem."""


class Interrupted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM arrived: stop cleanly like Ctrl-C."""


def machine_devices() -> list[str]:
    """The devices this machine can measure on: the CPU always, CUDA when present."""
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def judge(value: float, bound: dict[str, float]) -> str:
    """holds when ``value`` meets every side of ``bound``, else fails (NaN fails)."""
    if math.isnan(value):
        return "fails"
    if "min" in bound and value < bound["min"]:
        return "fails"
    if "max" in bound and value > bound["max"]:
        return "fails"
    return "holds"


def seed_figures(seed: str) -> list[float]:
    """The "x" figures in a seed text ("2-4x faster" -> [2, 4]); percentages and bare numbers are not factors."""
    figures = []
    for low, high, unit in SEED_FIGURE.findall(seed):
        if unit in ("x", "×"):
            figures += [float(low)] + ([float(high)] if high else [])
    return figures


def too_good(claim: Claim, value: float) -> bool:
    """A higher-is-better figure more than 10x beyond the seed's largest factor (e.g. > 40x for "2-4x")."""
    if "min" not in claim.bound or "max" in claim.bound:
        return False
    figures = seed_figures(claim.seed)
    return bool(figures) and value > SUSPICIOUS_FACTOR * max(figures)


def guard_crossed(value: float | None, guard: dict[str, float] | None) -> bool | None:
    """None without a guard or a figure; else whether ``value`` is outside the guard."""
    if guard is None or value is None:
        return None
    return judge(float(value), guard) == "fails"


def verdict_of(claim: Claim, value: float) -> tuple[str, bool]:
    """(verdict, flagged) of a measured figure under the claim's bound and review rule."""
    flagged = too_good(claim, value)
    if flagged and not claim.review_note:
        return "review", True
    return judge(value, claim.bound), flagged


def spec_sha(spec: Spec) -> str:
    """Hash of the spec file as measured: the report says when a spec changed since."""
    return hashlib.sha256(Path(spec.path).read_bytes()).hexdigest()[:16]


def claim_row(claim: Claim, device: str, mode: str) -> dict[str, Any]:
    """The row a claim starts as, before (or without) a measurement."""
    return {
        "name": claim.name, "seed": claim.seed, "metric": claim.metric, "unit": claim.unit,
        "bound": claim.bound, "guard": claim.guard, "gated": claim.gated, "guard_note": claim.guard_note,
        "unguarded": claim.unguarded, "review_note": claim.review_note, "devices": claim.devices,
        "note": claim.note, "device": device, "mode": mode, "value": None, "spread": None, "details": {},
        "plots": [], "text": "", "images": [],
    }


def static_verdict(spec: Spec, claim: Claim, device: str, quick: bool, have: list[str]) -> dict[str, Any] | None:
    """The row of a claim that needs no measurement (planned, n/a, not run), or None."""
    mode = "quick" if quick else "full"
    row = claim_row(claim, device, mode)
    if not spec.implemented:
        return row | {"verdict": "planned"}
    if device not in have:
        reason = claim.na_reason or f"needs {device}; this machine has {', '.join(have)}"
        return row | {"verdict": "n/a", "na_reason": reason}
    if quick and not claim.quick:
        return row | {"verdict": "not run", "na_reason": "only measured at full size (quick = false)"}
    return None


def measure_claim(spec: Spec, claim: Claim, ctx: Context) -> dict[str, Any]:
    """Measure one claim on ``ctx.device``; the returned row is what results.json and the report show."""
    row = claim_row(claim, ctx.device, "quick" if ctx.quick else "full")
    start = time.perf_counter()
    try:
        result = resolve(claim.workload)(ctx)
        if not isinstance(result, Result):
            raise TypeError(f"workload {claim.workload} returned {type(result).__name__}, not a Result")
        value = result.value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"degenerate measurement: the claim's figure is {value!r} (must be a finite number)")
    except NotApplicable as e:
        return row | {"verdict": "n/a", "na_reason": e.reason, "seconds": time.perf_counter() - start}
    except Exception:
        return row | {"verdict": "error", "error": traceback.format_exc(), "seconds": time.perf_counter() - start}
    row |= result.to_json()
    row["unit"] = result.unit or claim.unit
    row["verdict"], row["flagged"] = verdict_of(claim, float(value))
    row["guard_crossed"] = guard_crossed(value, claim.guard)
    row["seconds"] = time.perf_counter() - start
    return row


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when the bench process dies, so no orphan measures on."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(conn: Any, spec_path: str, jobs: list[tuple[str, str]], quick: bool, threads: int) -> None:
    """Measure ``jobs`` (claim name, device) of one spec, sending ("start", i) and ("row", i, row)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench process decides what Ctrl-C stops
    _die_with_parent()
    import torch

    if threads:
        torch.set_num_threads(threads)
    spec = load_spec(spec_path)
    claims = {c.name: c for c in spec.claims}
    for i, (name, device) in enumerate(jobs):
        conn.send(("start", i))
        ctx = Context(quick=quick, device=device, threads=torch.get_num_threads())
        conn.send(("row", i, json.loads(json.dumps(measure_claim(spec, claims[name], ctx), default=str))))
    conn.close()


@dataclass
class Job:
    spec: Spec
    claim: Claim
    device: str

    @property
    def key(self) -> str:
        return f"{self.spec.slug}|{self.claim.name}|{self.device}"


def _run_isolated(spec: Spec, jobs: list[Job], quick: bool, threads: int, on_start: Any, on_row: Any) -> None:
    """Measure ``jobs`` of one spec in worker processes; a hang or a dead worker becomes an error row."""
    ctx = mp.get_context("spawn")
    pending = list(jobs)
    while pending:
        parent, child = ctx.Pipe(duplex=False)
        # not daemonic: multi-rank workloads (P21, P23, P24) start their ranks from the worker, which a daemonic
        # process may not do; the worker dies with the bench (PDEATHSIG) and is killed below on a timeout
        proc = ctx.Process(target=_worker, daemon=False,
                           args=(child, str(spec.path), [(j.claim.name, j.device) for j in pending], quick, threads))
        proc.start()
        child.close()
        done = 0
        try:
            for i, job in enumerate(pending):
                started = time.perf_counter()
                failure = None
                if not parent.poll(WORKER_START_S if i == 0 else job.claim.timeout_s):
                    failure = f"the worker did not start '{job.claim.name}' within {WORKER_START_S} s"
                else:
                    try:
                        parent.recv()  # ("start", i)
                        on_start(job)
                        if parent.poll(job.claim.timeout_s):
                            _, _, row = parent.recv()
                            on_row(job, row)
                            done = i + 1
                            continue
                        failure = f"timed out after {job.claim.timeout_s:g} s (timeout_s)"
                    except EOFError:
                        proc.join(5)
                        failure = f"the worker process died during the claim: {exit_reason(proc.exitcode)}"
                row = claim_row(job.claim, job.device, "quick" if quick else "full")
                on_row(job, row | {"verdict": "error", "error": failure, "seconds": time.perf_counter() - started})
                done = i + 1
                break
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            parent.close()
        pending = pending[done:]


def _run_inline(jobs: list[Job], quick: bool, threads: int, on_start: Any, on_row: Any) -> None:
    """Measure ``jobs`` in this process (tests; no timeout or crash protection)."""
    import torch

    for job in jobs:
        on_start(job)
        ctx = Context(quick=quick, device=job.device, threads=threads or torch.get_num_threads())
        on_row(job, json.loads(json.dumps(measure_claim(job.spec, job.claim, ctx), default=str)))


def plan(specs: list[Spec], devices: list[str] | None = None, have: list[str] | None = None) -> list[Job]:
    """Every (spec, claim, device) of a run: each claim on each of its devices this machine has, the
    claim's first device when it has none of them (an n/a row); ``devices`` restricts (``--device``)."""
    have = machine_devices() if have is None else have
    jobs = []
    for spec in specs:
        for claim in spec.claims:
            wanted = [d for d in claim.devices if d in have and (devices is None or d in devices)]
            if not wanted and (devices is None or claim.devices[0] in devices):
                wanted = [claim.devices[0]]
            jobs += [Job(spec, claim, d) for d in wanted]
    return jobs


def run(
    specs: list[Spec], quick: bool = False, progress: bool = True, devices: list[str] | None = None,
    resume: bool = False, isolate: bool = True, have: list[str] | None = None, log: Any = print,
) -> dict[str, Any]:
    """Measure the claims of ``specs``, writing results.json after every row; returns the whole file.

    ``resume`` continues the interrupted run of the same commit and mode in results.json, skipping
    the rows it already measured. Ctrl-C or SIGTERM stops cleanly: finished rows are kept, the run is
    marked interrupted, and ``Interrupted``/``KeyboardInterrupt`` propagates to the caller.
    """
    import torch
    from tqdm.auto import tqdm

    have = machine_devices() if have is None else have
    threads = torch.get_num_threads()
    mode = "quick" if quick else "full"
    env = environment() | {"quick": quick, "mode": mode}
    previous = load_results(log=log)
    jobs = plan(specs, devices, have)
    run_info = {"id": uuid.uuid4().hex[:12], "commit": env["commit"], "mode": mode, "started": env["date"],
                "total": len(jobs), "done": 0, "complete": False, "interrupted": None,
                "projects": [s.slug for s in specs]}
    measured: set[str] = set()
    if resume:
        run_info, measured = _resumable(previous, env["commit"], mode, len(jobs))
        log(f"resuming run {run_info['id']}: {len(measured)} of {len(jobs)} claims already measured, skipped")
    by_slug = {p["slug"]: p for p in previous.get("projects", [])}
    for spec in specs:
        entry = by_slug.get(spec.slug, {})
        by_slug[spec.slug] = project_entry(spec) | {
            "claims": entry.get("claims", []), "environment": env, "spec_sha": spec_sha(spec)}
    results = {"format": FORMAT, "updated": env["date"], "run": run_info, "projects": []}

    def write() -> None:
        results["projects"] = sorted(by_slug.values(), key=lambda p: p["project"])
        results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(results)

    def on_start(job: Job) -> None:
        bar.set_postfix_str(f"{job.spec.slug}: {job.claim.name} [{job.device}]"[:70])

    def on_row(job: Job, row: dict[str, Any]) -> None:
        row |= {"commit": env["commit"], "run_id": run_info["id"], "measured_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        claims = by_slug[job.spec.slug]["claims"]
        claims[:] = [c for c in claims if (c["name"], c.get("device")) != (row["name"], row["device"])] + [row]
        order = {(c.name, d): i for i, c in enumerate(job.spec.claims) for d in c.devices}
        claims.sort(key=lambda c: order.get((c["name"], c.get("device")), len(order)))
        run_info["done"] += 1
        measured.add(job.key)
        bar.update(1)
        write()

    todo = [j for j in jobs if j.key not in measured]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="claims", disable=not progress, unit="claim")
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous_term = None
    try:
        write()
        for spec in specs:
            spec_jobs = [j for j in todo if j.spec is spec]
            to_measure = []
            for job in spec_jobs:
                row = static_verdict(spec, job.claim, job.device, quick, have)
                if row is not None:
                    on_row(job, row)
                else:
                    to_measure.append(job)
            if not to_measure:
                continue
            if isolate:
                _run_isolated(spec, to_measure, quick, threads, on_start, on_row)
            else:
                _run_inline(to_measure, quick, threads, on_start, on_row)
        # rows of claims no longer in the specs (renamed, removed) would be stale: drop them
        for spec in specs:
            keep = {(c.name, d) for c in spec.claims for d in c.devices}
            entry = by_slug[spec.slug]
            entry["claims"] = [c for c in entry["claims"] if (c["name"], c.get("device")) in keep]
        run_info["complete"] = True
        write()
    except (KeyboardInterrupt, Interrupted):
        run_info["interrupted"] = f"interrupted after {run_info['done']} of {run_info['total']} claims"
        write()
        raise
    finally:
        bar.close()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return results


def _resumable(previous: dict[str, Any], commit: str, mode: str, total: int) -> tuple[dict[str, Any], set[str]]:
    """The previous run's info and the keys of the rows it measured, if it is a run to resume."""
    info = previous.get("run")
    if not info:
        raise ResultsFileError(f"{RESULTS}: no run to resume (no results, or a file from before runs were "
                               "recorded); run without --resume")
    if info.get("complete"):
        raise ResultsFileError(f"{RESULTS}: the last run ({info['commit'][:10]}, {info['mode']}) completed; "
                               "nothing to resume: run without --resume")
    if (info.get("commit"), info.get("mode")) != (commit, mode):
        raise ResultsFileError(f"{RESULTS}: the interrupted run measured commit {info.get('commit', '?')[:10]} in "
                               f"{info.get('mode')} mode; this is {commit[:10]} in {mode} mode: --resume continues "
                               "only the same commit and mode")
    keys = {f"{p['slug']}|{c['name']}|{c.get('device')}" for p in previous["projects"] for c in p["claims"]
            if c.get("run_id") == info["id"]}
    return info | {"total": total, "done": len(keys), "interrupted": None}, keys


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


def save_results(results: dict[str, Any], path: Path | None = None) -> None:
    """Write ``results`` atomically: a temp file, flushed to disk, renamed over the old one."""
    path = path or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def validate_results(data: Any) -> str | None:
    """What is wrong with ``data`` as a results file, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    projects = data.get("projects")
    if not isinstance(projects, list):
        return "no 'projects' list: not a results file of this harness"
    for i, p in enumerate(projects):
        if not isinstance(p, dict) or not isinstance(p.get("slug"), str) or not isinstance(p.get("claims"), list):
            return f"projects[{i}] lacks a 'slug' or a 'claims' list"
        for j, c in enumerate(p["claims"]):
            if not isinstance(c, dict) or "name" not in c or "verdict" not in c:
                return f"projects[{i}].claims[{j}] lacks a 'name' or a 'verdict'"
    return None


def load_results(path: Path | None = None, move_aside: bool = True, log: Any = print) -> dict[str, Any]:
    """The stored results, or an empty file's. An unreadable or foreign file is reported in one line
    and moved aside (never overwritten); ``move_aside=False`` raises ``ResultsFileError`` instead."""
    path = path or RESULTS
    if not path.is_file():
        return {"projects": []}
    try:
        data = json.loads(path.read_text())
        problem = validate_results(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"not valid JSON ({e})"
    if problem is None:
        return data
    if not move_aside:
        raise ResultsFileError(f"{path}: {problem}")
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    log(f"warning: {path}: {problem}; moved aside to {aside.name}, starting a fresh results file")
    return {"projects": []}


def gate_failures(results: dict[str, Any], slugs: set[str], checks: dict[str, Any] | None = None) -> list[str]:
    """Lines naming each crossed guard, review and error in ``slugs``, and failed checks of this commit."""
    bad = []
    for project in results["projects"]:
        if project["slug"] not in slugs:
            continue
        where = f"P{project['project']} {project['slug']}"
        for c in project["claims"]:
            what = f"'{c['name']}' [{c.get('device', '?')}]"
            if c["verdict"] == "error":
                bad.append(f"{where}: {what} errored: {str(c.get('error', '')).strip().splitlines()[-1:]}")
            elif c["verdict"] == "review":
                bad.append(f"{where}: {what} measured {c['value']:.4g}, more than {SUSPICIOUS_FACTOR}x the seed's "
                           "figure: explain it with review_note in the spec, or find the bug")
            elif c.get("guard_crossed"):
                bad.append(f"{where}: {what} crossed its guard: measured {c['value']:.4g}, guard {c['guard']}")
    failed = (checks or {}).get("failed", {})
    for slug in sorted(set(failed) & slugs):
        bad.append(f"{slug}: {failed[slug]} check(s) failed in the last test run of this commit")
    return bad
