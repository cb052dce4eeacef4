"""``python -m harness compare A B``: two results files side by side (two machines, two commits, a quick
and a full run, CPU and GPU).

Both files are re-judged by this checkout's specs (as ``report`` does), loaded into pandas frames and
joined on (project, claim, device). Each row shows both figures with their spread, B / A, both verdicts
and a flag where B differs from A by more than each run's spread (its IQR width, at least +-1% of the
figure: ``MIN_BAND``), where the verdict flipped, or where a guard is crossed on one side only. B / A is
shown where both figures are positive, else B - A. The environments (CPU,
threads, torch, commit, mode) sit side by side at the top. Output: a Markdown table (printed)
and an HTML page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from harness.ledger import ENV_KEYS, KEY, ledger_frame, read_results
from harness.report import TEMPLATES, fmt

MIN_BAND = 0.01  # a run measured once (no IQR) is given a +-1% band: repeat measurements of "fixed" figures
# (a peak memory, a loss after a seeded training) move in the 3rd-4th digit between processes and machines
FLAG_TEXT = {"one side": "measured on one side only", "flipped": "verdict flipped", "guard": "guard crossed",
             "spread": "beyond both spreads"}


def environment(results: dict[str, Any]) -> dict[str, str]:
    """One column of the environment table: the run's commit, mode and id, then each environment field
    (several values, when projects were measured in different sessions, joined with ' / ')."""
    run = results.get("run") or {}
    envs = [p.get("environment") or {} for p in results.get("projects", [])]
    out = {"run": str(run.get("id", "")), "commit": str(run.get("commit", ""))[:10], "mode": str(run.get("mode", "")),
           "started": str(run.get("started", "")), "complete": str(run.get("complete", ""))}
    dates = sorted(str(e["date"]) for e in envs if e.get("date"))
    out["measured"] = f"{dates[0]} .. {dates[-1]}" if dates else ""
    modes = pd.Series([c.get("mode") for p in results.get("projects", []) for c in p["claims"] if c.get("mode")])
    out["rows by mode"] = ", ".join(f"{n} {m}" for m, n in modes.value_counts().items())
    for key in ENV_KEYS:
        values = list(dict.fromkeys(str(e[key]) for e in envs if e.get(key) not in (None, "")))
        out[key] = " / ".join(values)
    return out


def _width(value: float, lo: float, hi: float) -> float:
    """The IQR width of a figure, at least ``MIN_BAND`` of its magnitude on each side."""
    iqr = 0.0 if pd.isna(lo) or pd.isna(hi) else abs(hi - lo)
    return max(iqr, 2 * MIN_BAND * abs(value))


def flags(row: pd.Series) -> list[str]:
    """Why a joined row deserves a look: it was measured in one run only, the verdict flipped, a guard
    is crossed on one side only, or the figure moved by more than both runs' spread."""
    out = []
    if "absent" in (row["verdict_a"], row["verdict_b"]):
        return ["one side"]
    if row["verdict_a"] != row["verdict_b"]:
        out.append("flipped")
    if bool(row["guard_crossed_a"]) != bool(row["guard_crossed_b"]):
        out.append("guard")
    a, b = row["value_a"], row["value_b"]
    if not (pd.isna(a) or pd.isna(b)):
        change = abs(b - a)
        spread = max(_width(a, row["spread_lo_a"], row["spread_hi_a"]),
                     _width(b, row["spread_lo_b"], row["spread_hi_b"]))
        if change > spread:
            out.append("spread")
    return out


def compare_frames(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The outer join of two ledgers on (project, claim, device): ``*_a`` / ``*_b`` columns, ``ratio``
    (B / A where both are > 0, else NaN), ``diff`` (B - A) and ``flags`` (a list of ``FLAG_TEXT`` keys)."""
    keep = ["value", "spread_lo", "spread_hi", "unit", "verdict", "guard_crossed", "mode", "commit"]
    joined = a[KEY + ["title", "bound"] + keep].merge(b[KEY + ["title", "bound"] + keep], on=KEY, how="outer",
                                                        suffixes=("_a", "_b"))
    joined["title"] = joined["title_a"].fillna(joined["title_b"])
    joined["bound"] = joined["bound_a"].fillna(joined["bound_b"])
    joined["unit"] = joined["unit_a"].fillna(joined["unit_b"]).fillna("")
    for side in ("a", "b"):
        joined[f"verdict_{side}"] = joined[f"verdict_{side}"].fillna("absent")
        joined[f"guard_crossed_{side}"] = joined[f"guard_crossed_{side}"].fillna(False).astype(bool)
    joined["ratio"] = [b_ / a_ if a_ > 0 and b_ > 0 else math.nan  # NaN compares False
                       for a_, b_ in zip(joined["value_a"], joined["value_b"], strict=True)]
    joined["diff"] = joined["value_b"] - joined["value_a"]
    joined["flags"] = [flags(row) for _, row in joined.iterrows()]
    return joined.sort_values(["project", "claim", "device"]).reset_index(drop=True)


def _figure(value: float, lo: float, hi: float, unit: str) -> str:
    if pd.isna(value):
        return ""
    text = f"{fmt(float(value))} {unit}".strip()
    if not (pd.isna(lo) or pd.isna(hi)):
        text += f" (IQR {fmt(float(lo))}-{fmt(float(hi))})"
    return text


def change(row: pd.Series) -> str:
    """B / A where both figures are positive; else the signed difference (a delta bounded at 0 has no
    meaningful ratio)."""
    if not pd.isna(row["ratio"]):
        return f"{row['ratio']:.3g}"
    return "" if pd.isna(row["diff"]) else f"{row['diff']:+.3g} (B - A)"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown(env_a: dict[str, str], env_b: dict[str, str], joined: pd.DataFrame) -> str:
    """The environments, then one table row per joined claim."""
    lines = ["| | A | B |", "|---|---|---|"]
    lines += [f"| {k} | {_cell(env_a.get(k, ''))} | {_cell(env_b.get(k, ''))} |" for k in env_a]
    lines += ["", "| # | project | claim | device | bound | A | B | B / A | verdict A | verdict B | flag |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in joined.iterrows():
        ratio = change(r)
        flag = ", ".join(FLAG_TEXT[f] for f in r["flags"])
        lines.append(
            f"| {r['project']} | {_cell(r['title'])} | {_cell(r['claim'])} | {r['device']} | {_cell(r['bound'])} | "
            f"{_cell(_figure(r['value_a'], r['spread_lo_a'], r['spread_hi_a'], r['unit']))} | "
            f"{_cell(_figure(r['value_b'], r['spread_lo_b'], r['spread_hi_b'], r['unit']))} | {ratio} | "
            f"{r['verdict_a']} | {r['verdict_b']} | {flag} |")
    return "\n".join(lines)


def html(env_a: dict[str, str], env_b: dict[str, str], joined: pd.DataFrame, names: tuple[str, str]) -> str:
    """The same comparison as an HTML page in the report's style."""
    jenv = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    rows = []
    for _, r in joined.iterrows():
        rows.append({
            "project": r["project"], "title": r["title"], "claim": r["claim"], "device": r["device"],
            "bound": r["bound"], "a": _figure(r["value_a"], r["spread_lo_a"], r["spread_hi_a"], r["unit"]),
            "b": _figure(r["value_b"], r["spread_lo_b"], r["spread_hi_b"], r["unit"]),
            "ratio": change(r), "verdict_a": r["verdict_a"],
            "verdict_b": r["verdict_b"], "flags": [FLAG_TEXT[f] for f in r["flags"]],
            "mode_a": r["mode_a"] if isinstance(r["mode_a"], str) else "",
            "mode_b": r["mode_b"] if isinstance(r["mode_b"], str) else "",
        })
    return jenv.get_template("compare.html.j2").render(env_a=env_a, env_b=env_b, rows=rows, names=names,
                                                       n_flagged=sum(bool(r["flags"]) for r in rows))


def compare(path_a: str | Path, path_b: str | Path, out_dir: Path) -> tuple[str, Path, pd.DataFrame]:
    """Compare two results files: (the Markdown, the HTML page written in ``out_dir``, the joined frame).
    Raises ``harness.ledger.LedgerFileError`` (one line) for a file that is not a usable results file."""
    results_a, results_b = read_results(path_a), read_results(path_b)
    env_a, env_b = environment(results_a), environment(results_b)
    joined = compare_frames(ledger_frame(results_a, measured_only=True), ledger_frame(results_b, measured_only=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(env_a, env_b, joined)
    page = out_dir / "compare.html"
    page.write_text(html(env_a, env_b, joined, (str(path_a), str(path_b))))
    (out_dir / "compare.md").write_text(md + "\n")
    return md, page, joined
