"""Render ``reports/out/results.json`` into ``index.html`` (the claims ledger of all 30 projects)
and one page per project with its plots (matplotlib PNGs) and images (screenshots a workload took)."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to files
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402

from harness.bench import (  # noqa: E402
    OUT_DIR,
    claim_row,
    guard_crossed,
    load_results,
    project_entry,
    spec_sha,
    verdict_of,
)
from harness.measure import git_commit  # noqa: E402
from harness.spec import Claim, Spec, load_specs  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"
CHECKS_XML = OUT_DIR / "checks.xml"
VERDICTS = ("holds", "fails", "review", "n/a", "error", "not run", "planned")
REJUDGED = ("holds", "fails", "review")  # verdicts that follow from a figure and the spec


def _empty_row(claim: Claim, verdict: str) -> dict[str, Any]:
    return claim_row(claim, claim.devices[0], "") | {"verdict": verdict}


def rejudge(results: dict[str, Any], specs: list[Spec] | None = None) -> dict[str, Any]:
    """``results`` judged against the current specs: every project of the roadmap (planned ones as
    planned, implemented ones never measured as "not run"), each stored figure judged by the
    current bound, guard and review rule, each row's texts from the current spec; a project whose
    spec changed since its measurement says so, and claims the spec no longer has are dropped."""
    specs = load_specs(check_import=False) if specs is None else specs
    stored = {p["slug"]: p for p in results.get("projects", [])}
    projects = []
    for spec in specs:
        entry = stored.get(spec.slug)
        if entry is None or not spec.implemented:
            verdict = "planned" if not spec.implemented else "not run"
            projects.append(project_entry(spec) | {"claims": [_empty_row(c, verdict) for c in spec.claims]})
            continue
        rows: dict[str, list[dict[str, Any]]] = {}
        for row in entry["claims"]:
            rows.setdefault(row["name"], []).append(row)
        claims, dropped = [], sorted(set(rows) - {c.name for c in spec.claims})
        for claim in spec.claims:
            for row in rows.get(claim.name) or [_empty_row(claim, "not run")]:
                row = dict(row)
                measured_as = {k: row.get(k) for k in ("bound", "guard")}
                row |= {k: v for k, v in claim_row(claim, row.get("device", ""), row.get("mode", "")).items()
                        if k not in ("device", "mode", "value", "spread", "details", "plots", "text",
                                          "images")}
                if row["verdict"] in REJUDGED and row.get("value") is not None:
                    row["verdict"], row["flagged"] = verdict_of(claim, float(row["value"]))
                    row["guard_crossed"] = guard_crossed(row["value"], claim.guard)
                    if measured_as["bound"] not in (None, claim.bound):
                        row["rejudged"] = f"measured against bound {bound_text(measured_as['bound'])}"
                claims.append(row)
        changed = entry.get("spec_sha") not in (None, spec_sha(spec))
        projects.append(entry | project_entry(spec) | {
            "claims": claims, "spec_changed": changed, "dropped_claims": dropped})
    return results | {"projects": projects}


def fmt(value: Any) -> str:
    """A number in 4 significant figures; anything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, (int, float)):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


def bound_text(bound: dict[str, float]) -> str:
    if "min" in bound and "max" in bound:
        return f"= {fmt(bound['min'])}" if bound["min"] == bound["max"] else \
            f"{fmt(bound['min'])} .. {fmt(bound['max'])}"
    return f">= {fmt(bound['min'])}" if "min" in bound else f"<= {fmt(bound['max'])}"


def render_plot(plot: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    if plot.get("kind") == "bar":
        # grouped bars: one group per x (labels from x, or from "a | b | c" in xlabel), one bar per series
        xlabel = plot.get("xlabel", "")
        labels = xlabel.split(" | ") if " | " in xlabel else [str(x) for x in plot["x"]]
        n_groups = max(len(ys) for ys in plot["series"].values())
        labels = (labels + [""] * n_groups)[:n_groups]
        width = 0.8 / len(plot["series"])
        for i, (name, ys) in enumerate(plot["series"].items()):
            ax.bar([g + i * width for g in range(len(ys))], ys, width, label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(n_groups)], labels, rotation=15)
        ax.set_ylabel(plot.get("ylabel", ""))
        if len(plot["series"]) > 1:
            ax.legend(fontsize=8)
        if plot.get("logy"):
            ax.set_yscale("log")
    else:
        for name, ys in plot["series"].items():
            ax.plot(plot["x"][: len(ys)], ys, marker="o", markersize=3, label=name)
        ax.set_xlabel(plot.get("xlabel", ""))
        ax.set_ylabel(plot.get("ylabel", ""))
        ax.legend(fontsize=8)
        if plot.get("logx"):
            ax.set_xscale("log")
        if plot.get("logy"):
            ax.set_yscale("log")
    ax.set_title(plot.get("title", ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


VERDICT_COLOURS = {"holds": "#2e8b3d", "fails": "#c8372d", "review": "#9b2fa3"}


def margin(value: float, bound: dict[str, float]) -> float | None:
    """How far a figure stands from its bound, oriented so that > 1 meets it: measured / min for a
    lower bound, max / measured for an upper bound, the tighter of the two for a band. None where the
    ratio means nothing (a bound at or below 0, e.g. a signed loss difference, or a figure <= 0)."""
    sides = []
    if "min" in bound:
        sides.append(value / bound["min"] if bound["min"] > 0 and value > 0 else None)
    if "max" in bound:
        sides.append(bound["max"] / value if bound["max"] > 0 and value > 0 else None)
    return None if not sides or None in sides else min(sides)


def standing_plot(results: dict[str, Any], path: Path) -> tuple[int, int]:
    """The index page's first figure: every measured claim's ``margin`` on a log axis, coloured by
    verdict, one row per claim and device in roadmap order. Returns (claims plotted, measured claims
    left out because their bound is at or below 0)."""
    points, skipped = [], 0
    for p in results["projects"]:
        for c in p["claims"]:
            if c["verdict"] not in VERDICT_COLOURS or c.get("value") is None:
                continue
            m = margin(float(c["value"]), c["bound"])
            if m is None:
                skipped += 1
                continue
            label = f"P{p['project']} {c['name']}"
            points.append((label[:58] + ("..." if len(label) > 58 else "") + f" [{c.get('device', '')}]",
                           m, c["verdict"]))
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.19 * max(len(points), 1)), dpi=100)
    ys = list(range(len(points)))[::-1]
    for verdict, colour in VERDICT_COLOURS.items():
        sel = [(y, m) for y, (_, m, v) in zip(ys, points, strict=True) if v == verdict]
        if sel:
            ax.scatter([m for _, m in sel], [y for y, _ in sel], c=colour, s=22, label=verdict, zorder=3)
    for y, (_, m, v) in zip(ys, points, strict=True):
        ax.plot([1, m], [y, y], color=VERDICT_COLOURS[v], alpha=0.35, lw=1.5)
    ax.axvline(1, color="#444", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(ys, [label for label, _, _ in points], fontsize=7)
    ax.set_ylim(-1, len(points))
    ax.set_xlabel("measured / bound (inverted for upper bounds): right of 1 meets the roadmap's claim", fontsize=8)
    ax.set_title("Where every measured claim stands", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(points), skipped


def check_outcomes(path: Path = CHECKS_XML, commit: str | None = None) -> dict[str, Any]:
    """The last test run's outcomes (JUnit XML written by ``nox -s test``), if it ran on ``commit``
    (default HEAD): {"commit", "per_slug": {slug: {passed, failed, skipped}}, "failed": {slug: n}};
    else {"commit": the run's commit or None, "stale": True}."""
    commit = commit or git_commit()
    if not path.is_file():
        return {"commit": None, "stale": True}
    root = ET.parse(path).getroot()
    stamped = next((prop.get("value") for prop in root.iter("property") if prop.get("name") == "commit"), None)
    if stamped != commit:
        return {"commit": stamped, "stale": True}
    counts: dict[str, Counter] = {}
    for case in root.iter("testcase"):
        match = re.search(r"\[([a-z0-9_]+)/", case.get("name", ""))
        if not match:
            continue
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        outcome = "failed" if failed else "skipped" if skipped else "passed"
        counts.setdefault(match.group(1), Counter())[outcome] += 1
    per_slug = {slug: dict(c) for slug, c in counts.items()}
    return {"commit": commit, "stale": False, "per_slug": per_slug,
            "failed": {slug: c["failed"] for slug, c in per_slug.items() if c.get("failed")}}


def render(results: dict[str, Any] | None = None, out_dir: Path = OUT_DIR) -> Path:
    """Write index.html, one page per project and their plots; returns the index path."""
    results = rejudge(results if results is not None else load_results(move_aside=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "img").mkdir(exist_ok=True)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = fmt
    env.filters["bound"] = bound_text
    checks = check_outcomes()
    totals: Counter = Counter()
    for project in results["projects"]:
        project["check_outcomes"] = {} if checks["stale"] else checks["per_slug"].get(project["slug"], {})
        project["checks_commit"] = checks["commit"]
        project["checks_stale"] = checks["stale"]
        for claim in project["claims"]:
            totals[claim["verdict"]] += 1
            claim["plot_files"] = []
            for i, plot in enumerate(claim.get("plots") or []):
                name = f"img/{project['slug']}-{re.sub(r'[^a-z0-9]+', '-', claim['name'].lower())}-{i}.png"
                render_plot(plot, out_dir / name)
                claim["plot_files"].append(name)
            claim["pictures"] = []
            for i, image in enumerate(claim.get("images") or []):
                name = f"img/{project['slug']}-{re.sub(r'[^a-z0-9]+', '-', claim['name'].lower())}-shot{i}.png"
                (out_dir / name).write_bytes(base64.b64decode(image["png_base64"]))
                claim["pictures"].append({"src": name, "title": image["title"]})
        page = env.get_template("project.html.j2").render(p=project)
        (out_dir / f"{project['project']:02d}_{project['slug']}.html").write_text(page)
    phases: dict[str, list[dict[str, Any]]] = {}
    for project in results["projects"]:
        phases.setdefault(project["phase"], []).append(project)
    plotted, unplotted = standing_plot(results, out_dir / "img" / "standing.png")
    index = env.get_template("index.html.j2").render(
        standing={"plotted": plotted, "unplotted": unplotted}, phases=phases,
        totals=[(v, totals.get(v, 0)) for v in VERDICTS], updated=results.get("updated", ""),
        run=results.get("run") or {}, head=git_commit(),
    )
    path = out_dir / "index.html"
    path.write_text(index)
    return path


def markdown(results: dict[str, Any] | None = None) -> str:
    """The measured claims as a Markdown table (for READMEs and issue notes), each row with its
    device, mode and commit."""
    results = rejudge(results if results is not None else load_results(move_aside=False))
    lines = ["| # | project | claim | bound | guard | measured | verdict | device | mode | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in results["projects"]:
        for c in p["claims"]:
            if c["verdict"] == "planned":
                continue
            value = "" if c["value"] is None else f"{fmt(c['value'])} {c['unit']}".strip()
            if c.get("spread"):
                value += f" (IQR {fmt(c['spread'][0])}-{fmt(c['spread'][1])})"
            if c["verdict"] in ("n/a", "not run") and c.get("na_reason"):
                value = c["na_reason"]
            guard = bound_text(c["guard"]) + (" crossed" if c.get("guard_crossed") else "") if c.get("guard") else ""
            lines.append(f"| {p['project']} | {p['title']} | {c['name']} | {bound_text(c['bound'])} | {guard} | "
                         f"{value} | {c['verdict']} | {c.get('device', '')} | {c.get('mode', '')} | "
                         f"{(c.get('commit') or '')[:8]} |")
    return "\n".join(lines)


def main() -> None:
    print(render())


if __name__ == "__main__":
    main()
