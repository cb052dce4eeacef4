"""``python -m harness list|check|bench|report|compare``: the verification engine's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.spec import SpecError, load_spec, load_specs, select


def _specs(args: argparse.Namespace, check_import: bool = True):
    """The specs matching ``-k``; only those are imported (a broken spec elsewhere does not block)."""
    specs = select(load_specs(check_import=False), args.k)
    if not specs:
        sys.exit(f"no spec matches -k {args.k!r}; `python -m harness list` shows them all")
    return [load_spec(s.path, check_import) for s in specs] if check_import else specs


def cmd_list(args: argparse.Namespace) -> int:
    for spec in _specs(args, check_import=False):
        print(f"{spec.project:2d}  {spec.slug:30s} {spec.status:12s} "
              f"{len(spec.checks)} checks, {len(spec.claims)} claims  {spec.title}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import pytest

    from harness.bench import OUT_DIR

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    pytest_args = ["tests/test_specs.py", "-q", f"--junitxml={OUT_DIR / 'checks.xml'}"]
    if args.k:
        slugs = [s.slug for s in _specs(args, check_import=False)]
        pytest_args += ["-k", " or ".join(slugs)]
    return int(pytest.main(pytest_args + args.pytest_args))


def _summary(results: dict, ran: set[str]) -> None:
    for project in results["projects"]:
        if project["slug"] not in ran or project["status"] == "planned":
            continue
        for c in project["claims"]:
            value = "" if c["value"] is None else f"{c['value']:.4g}{c['unit'] and ' ' + c['unit']}"
            guard = " GUARD CROSSED" if c.get("guard_crossed") else ""
            print(f"P{project['project']:<2} {project['slug']:<28} {c.get('device', ''):<5} {c['verdict']:<8} "
                  f"{value:>14}  {c['name']}{guard}")


def cmd_bench(args: argparse.Namespace) -> int:
    from harness import bench, report

    specs = _specs(args)
    ran = {s.slug for s in specs}
    devices = [args.device] if args.device else None
    try:
        results = bench.run(specs, quick=args.quick, progress=not args.no_progress, devices=devices,
                            resume=args.resume, log=lambda line: print(line, file=sys.stderr))
    except bench.ResultsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, bench.Interrupted) as e:
        results = bench.load_results(move_aside=False)
        print(f"\n{results['run']['interrupted']}: finished rows are kept in {bench.RESULTS}; "
              "continue with --resume", file=sys.stderr)
        print(f"report: {report.render(results)}")
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    index = report.render(results)
    _summary(results, ran)
    print(f"report: {index}")
    if args.gate:
        failures = bench.gate_failures(results, ran, report.check_outcomes())
        for line in failures:
            print(f"GATE: {line}", file=sys.stderr)
        return 1 if failures else 0
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness import report
    from harness.bench import RESULTS, ResultsFileError, load_results

    if not RESULTS.is_file():
        sys.exit(f"no results at {RESULTS}: run `python -m harness bench` (or `nox -s bench`) first")
    try:
        results = load_results(move_aside=False)
    except ResultsFileError as e:
        print(f"error: {e}; move it aside or run `python -m harness bench` for a fresh one", file=sys.stderr)
        return 2
    if args.csv is not False:
        from harness.bench import OUT_DIR
        from harness.ledger import write_csv

        path = args.csv if args.csv == "-" else Path(args.csv or OUT_DIR / "ledger.csv")
        n = write_csv(results, path)
        if args.csv != "-":
            print(f"ledger: {path} ({n} rows)")
    elif args.markdown:
        print(report.markdown(results))
    else:
        print(f"report: {report.render(results)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.bench import OUT_DIR
    from harness.compare import compare
    from harness.ledger import LedgerFileError

    try:
        md, page, joined = compare(args.a, args.b, Path(args.out) if args.out else OUT_DIR / "compare")
    except LedgerFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print(f"\n{sum(bool(f) for f in joined['flags'])} of {len(joined)} rows flagged; page: {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in [
        ("list", "list every spec with its status, checks and claims"),
        ("check", "run the spec-driven checks (pytest); extra args after -- go to pytest"),
        ("bench", "measure every claim, write reports/out/results.json and the HTML report"),
        ("report", "re-render the HTML report from reports/out/results.json"),
        ("compare", "two results files side by side: figures, spreads, B / A, verdicts, flags"),
    ]:
        if name == "compare":
            p = sub.add_parser(name, help=helptext, description=helptext + ". Both are re-judged by this "
                               "checkout's specs; writes compare.html and compare.md and prints the Markdown.")
            p.add_argument("a", help="results file A (e.g. another machine's reports/out/results.json)")
            p.add_argument("b", help="results file B")
            p.add_argument("--out", metavar="DIR", help="where compare.html / compare.md go (default: "
                           "reports/out/compare, or $HANDSON_REPORT_DIR/compare)")
            continue
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("-k", metavar="PROJECT", help="only projects whose slug, title or number matches")
        if name == "bench":
            p.add_argument("--quick", action="store_true", help="CI-sized workloads (minutes, not tens of minutes)")
            p.add_argument("--gate", action="store_true",
                           help="exit 1 if a claim crosses its guard, needs review or errors, or a check failed")
            p.add_argument("--device", choices=("cpu", "cuda"),
                           help="measure only on this device (default: every device of each claim this machine has)")
            p.add_argument("--resume", action="store_true",
                           help="continue the interrupted run of this commit and mode, skipping measured claims")
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "report":
            p.add_argument("--markdown", action="store_true", help="print the measured claims as a Markdown table")
            p.add_argument("--csv", nargs="?", const="", default=False, metavar="PATH",
                           help="export the ledger (one row per claim and device, with the environment) as CSV "
                                "to PATH ('-': stdout; default reports/out/ledger.csv)")
        if name == "check":
            p.add_argument("pytest_args", nargs="*", help="passed to pytest")
    args = parser.parse_args(argv)
    try:
        return {"list": cmd_list, "check": cmd_check, "bench": cmd_bench, "report": cmd_report,
                "compare": cmd_compare}[args.command](args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
