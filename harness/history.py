"""Per-commit history kept in the repository: asv's results and the harness's results.json.

``reports/history/`` is committed (``reports/out/`` is not), so the dashboard and comparisons
across commits survive a fresh clone:

- ``reports/history/asv-results/``: asv's ``results_dir`` (one folder per machine, one file per
  commit and environment), written by ``nox -s asv``.
- ``reports/history/results/<commit>.json``: the harness's results.json of that commit, holding
  only the projects that ``harness bench`` measured at exactly that commit.

``python -m harness.history record`` copies what ``reports/out/results.json`` holds for the
current commit; ``nox -s asv`` runs it after recording the commit in asv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HISTORY_DIR = Path(__file__).resolve().parent.parent / "reports" / "history"
ASV_RESULTS_DIR = HISTORY_DIR / "asv-results"  # asv.conf.json's results_dir names the same folder
RESULTS_DIR = HISTORY_DIR / "results"


def of_commit(results: dict[str, Any], commit: str) -> dict[str, Any]:
    """The part of a results.json measured at ``commit``: projects whose environment names it."""
    projects = [p for p in results.get("projects", []) if p.get("environment", {}).get("commit") == commit]
    return {"commit": commit, "projects": projects}


def record(results: dict[str, Any], commit: str, directory: Path = RESULTS_DIR) -> Path | None:
    """Merge the projects of ``results`` measured at ``commit`` into ``directory/<commit>.json``.

    A project measured again replaces its earlier entry; the others are kept. Returns the file
    written, or None when ``results`` holds nothing measured at ``commit`` (nothing is written).
    """
    mine = of_commit(results, commit)
    if not mine["projects"]:
        return None
    path = directory / f"{commit}.json"
    by_slug = {p["slug"]: p for p in load(commit, directory).get("projects", [])}
    by_slug |= {p["slug"]: p for p in mine["projects"]}
    merged = {"commit": commit, "projects": sorted(by_slug.values(), key=lambda p: p["project"])}
    from harness.bench import save_results  # the harness's one atomic write (temp file, fsync, rename)

    save_results(merged, path)
    return path


def load(commit: str, directory: Path = RESULTS_DIR) -> dict[str, Any]:
    """The stored results of ``commit`` (full hash), or an empty ``{"projects": []}``."""
    path = directory / f"{commit}.json"
    return json.loads(path.read_text()) if path.is_file() else {"commit": commit, "projects": []}


def commits(directory: Path = RESULTS_DIR) -> list[str]:
    """Every commit with stored results, oldest measurement first."""
    def measured(commit: str) -> str:
        dates = [p["environment"].get("date", "") for p in load(commit, directory)["projects"]]
        return min(dates, default="")

    return sorted((p.stem for p in directory.glob("*.json")), key=measured)


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.history record``: store what reports/out/results.json holds for HEAD."""
    from harness.bench import RESULTS, ResultsFileError, load_results
    from harness.measure import git_commit

    args = sys.argv[1:] if argv is None else argv
    if args != ["record"]:
        print("usage: python -m harness.history record", file=sys.stderr)
        return 2
    commit = git_commit()
    if not RESULTS.is_file():
        print(f"history: no {RESULTS} (run `nox -s bench` first); asv results only")
        return 0
    try:
        results = load_results(move_aside=False)
    except ResultsFileError as e:
        print(f"history: {e}; not recorded", file=sys.stderr)
        return 2
    path = record(results, commit)
    if path is None:
        print(f"history: {RESULTS} holds nothing measured at {commit[:10]}; not recorded")
    else:
        print(f"history: harness results of {commit[:10]} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
