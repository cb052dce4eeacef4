"""Render ``reports/out/results.json`` into ``index.html`` (the claims ledger of all 30 projects)
and one page per project with its plots (matplotlib PNGs)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to files
import matplotlib.pyplot as plt  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402

from harness.bench import OUT_DIR, load_results, project_entry  # noqa: E402
from harness.spec import load_specs  # noqa: E402

TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"
CHECKS_XML = OUT_DIR / "checks.xml"
VERDICTS = ("holds", "fails", "n/a", "error", "planned", "not run")


def with_every_spec(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` plus an entry for every spec it lacks, so the ledger always shows all 30
    projects: planned ones as planned, implemented ones never benched as "not run"."""
    present = {p["slug"] for p in results["projects"]}
    projects = list(results["projects"])
    for spec in load_specs(check_import=False):
        if spec.slug in present:
            continue
        verdict = "planned" if not spec.implemented else "not run"
        claims = [{"name": c.name, "seed": c.seed, "metric": c.metric, "unit": c.unit, "bound": c.bound,
                   "devices": c.devices, "gate": c.gate, "note": c.note, "device": "", "value": None,
                   "spread": None, "details": {}, "plots": [], "text": "", "verdict": verdict}
                  for c in spec.claims]
        projects.append(project_entry(spec) | {"claims": claims})
    return results | {"projects": sorted(projects, key=lambda p: p["project"])}


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


def check_outcomes() -> dict[str, dict[str, int]]:
    """From the last ``harness check`` run (JUnit XML): passed/failed test counts per spec slug."""
    if not CHECKS_XML.is_file():
        return {}
    counts: dict[str, Counter] = {}
    for case in ET.parse(CHECKS_XML).getroot().iter("testcase"):
        match = re.search(r"\[([a-z0-9_]+)/", case.get("name", ""))
        if not match:
            continue
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        outcome = "failed" if failed else "skipped" if skipped else "passed"
        counts.setdefault(match.group(1), Counter())[outcome] += 1
    return {slug: dict(c) for slug, c in counts.items()}


def render(results: dict[str, Any] | None = None, out_dir: Path = OUT_DIR) -> Path:
    """Write index.html, one page per project and their plots; returns the index path."""
    results = with_every_spec(results if results is not None else load_results())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "img").mkdir(exist_ok=True)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["fmt"] = fmt
    env.filters["bound"] = bound_text
    checks = check_outcomes()
    totals: Counter = Counter()
    for project in results["projects"]:
        project["check_outcomes"] = checks.get(project["slug"], {})
        for claim in project["claims"]:
            totals[claim["verdict"]] += 1
            claim["images"] = []
            for i, plot in enumerate(claim.get("plots") or []):
                name = f"img/{project['slug']}-{re.sub(r'[^a-z0-9]+', '-', claim['name'].lower())}-{i}.png"
                render_plot(plot, out_dir / name)
                claim["images"].append(name)
        page = env.get_template("project.html.j2").render(p=project)
        (out_dir / f"{project['project']:02d}_{project['slug']}.html").write_text(page)
    phases: dict[str, list[dict[str, Any]]] = {}
    for project in results["projects"]:
        phases.setdefault(project["phase"], []).append(project)
    index = env.get_template("index.html.j2").render(
        phases=phases, totals=[(v, totals.get(v, 0)) for v in VERDICTS], updated=results.get("updated", ""),
    )
    path = out_dir / "index.html"
    path.write_text(index)
    return path


def markdown(results: dict[str, Any] | None = None) -> str:
    """The measured claims as a Markdown table (for READMEs and issue notes)."""
    results = results if results is not None else load_results()
    lines = ["| # | project | claim | bound | measured | verdict |", "|---|---|---|---|---|---|"]
    for p in results["projects"]:
        for c in p["claims"]:
            if c["verdict"] == "planned":
                continue
            value = "" if c["value"] is None else f"{fmt(c['value'])} {c['unit']}".strip()
            if c.get("spread"):
                value += f" (IQR {fmt(c['spread'][0])}-{fmt(c['spread'][1])})"
            lines.append(f"| {p['project']} | {p['title']} | {c['name']} | {bound_text(c['bound'])} | {value} | "
                         f"{c['verdict']} |")
    return "\n".join(lines)


def main() -> None:
    print(render())


if __name__ == "__main__":
    main()
