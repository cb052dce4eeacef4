"""Project 29 claims: the Dockerfile lints clean, and one command brings the compose project up healthy.

The second needs a container engine. Where ``docker info`` fails (no daemon, no permission, no CLI) the claim
is n/a with the reason, so a machine without Docker says so and a user with Docker gets the real verdict:
the image is built, the model is put in the cache volume first (a one-time step, timed apart), and what is
timed is the one command, ``docker compose up``, until every long-running service reports healthy.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import httpx

from harness.measure import Context, MeasurementError, NotApplicable, Result
from impl.docker import deployment

HEALTHY_TIMEOUT_S = 900.0  # past this the up is a failure, not a slow figure


def hadolint_findings(ctx: Context) -> Result:
    """hadolint's findings on impl/docker/Dockerfile, every level, pragmas disabled (``deployment.hadolint``)."""
    findings = deployment.hadolint()
    version = subprocess.run([deployment.hadolint_binary(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    details = {"hadolint": version, "findings": [f"{f['code']} line {f['line']} ({f['level']}): {f['message']}"
                                                 for f in findings]}
    return Result(float(len(findings)), "findings", details=details)


def _run(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 3600.0) -> str:
    """Run ``argv``; its stdout, or MeasurementError with the tail of its output when it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-1500:]
        raise MeasurementError(f"`{' '.join(argv[:8])} ...` exited with {done.returncode}: {tail}")
    return done.stdout


def _engine(device: str) -> str:
    """The docker CLI's path once an engine answers and compose v2 is there; NotApplicable saying what is missing."""
    docker = shutil.which("docker")
    if docker is None:
        raise NotApplicable("no container engine reachable: no `docker` command on PATH")
    info = subprocess.run([docker, "info", "--format", "{{json .}}"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        raise NotApplicable(f"no container engine reachable: `docker info` failed: {reason}")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        raise NotApplicable("a Docker engine answers but the compose v2 plugin (`docker compose`) is missing")
    toolkit = "nvidia" in json.loads(info.stdout or "{}").get("Runtimes", {}) or \
        any(shutil.which(t) for t in ("nvidia-container-runtime-hook", "nvidia-ctk"))
    if device == "cuda" and not toolkit:
        raise NotApplicable("the Docker engine cannot reserve GPUs: no NVIDIA Container Toolkit (no nvidia "
                            "runtime in `docker info`, no nvidia-ctk)")
    return docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _states(base: list[str], env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Service -> its container's ``docker compose ps`` record (JSON array or JSON lines, by compose version)."""
    out = _run([*base, "ps", "--all", "--format", "json"], env, timeout_s=60).strip()
    rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
    return {r["Service"]: r for r in rows}


def compose_up_healthy(ctx: Context) -> Result:
    """Seconds from ``docker compose up --detach`` until router, both workers and the UI are healthy."""
    docker = _engine(ctx.device)
    files = deployment.COMPOSE_GPU_FILES if ctx.device == "cuda" else deployment.COMPOSE_FILES
    # quick: a throw-away project; full: one whose cache volume is kept, so `chat` is trained only once
    name = "handson-bench-quick" if ctx.quick else "handson-bench"
    model = "/cache/tiny" if ctx.quick else "chat"
    api_port, ui_port = _free_port(), _free_port()
    env = {**os.environ, "HANDSON_MODEL": model, "API_PORT": str(api_port), "UI_PORT": str(ui_port), "API_KEY": ""}
    base = [docker, "compose", "--project-name", name, *(a for f in files for a in ("--file", str(f)))]
    long_running = [s for s, spec in deployment.project(files, env)["services"].items() if spec.get("restart") != "no"]
    details: dict[str, Any] = {"model": model, "files": [os.path.basename(f) for f in files], "project": name}
    try:
        t0 = time.perf_counter()
        _run([*base, "build"], env)
        details["build_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        if ctx.quick:
            _run([*base, "run", "--rm", "--no-deps", "--entrypoint", "python", "model", "-c",
                  "from impl.serving.tiny import save_tiny_chat_model; save_tiny_chat_model('/cache/tiny')"], env)
        else:
            _run([*base, "run", "--rm", "--no-deps", "model"], env)  # trains chat into the volume unless cached
        details["model_prepare_s"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        _run([*base, "up", "--detach"], env, timeout_s=HEALTHY_TIMEOUT_S)
        while True:
            states = _states(base, env)
            if all(states.get(s, {}).get("Health") == "healthy" for s in long_running):
                break
            dead = [s for s in long_running if states.get(s, {}).get("State") in ("exited", "dead")]
            if dead or time.perf_counter() - t0 > HEALTHY_TIMEOUT_S:
                logs = _run([*base, "logs", "--tail", "30", *dead], env, timeout_s=60)[-3000:]
                raise MeasurementError(f"services {dead or long_running} not healthy after "
                                       f"{time.perf_counter() - t0:.0f} s: {logs}")
            time.sleep(0.5)
        seconds = time.perf_counter() - t0
        details["services"] = {s: {k: v.get(k) for k in ("State", "Health")} for s, v in states.items()}

        url = f"http://127.0.0.1:{api_port}"
        model_id = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                           json={"model": model_id, "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": "Hello!"}]})
        if reply.status_code != 200:
            raise MeasurementError(f"the service is healthy but a chat completion got {reply.status_code}: "
                                   f"{reply.text[:300]}")
        details["chat_reply"] = reply.json()["choices"][0]["message"]["content"]
        details["ui_status"] = httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=30).status_code
    finally:
        subprocess.run([*base, "down", "--remove-orphans", *(["--volumes"] if ctx.quick else [])],
                       capture_output=True, env=env, timeout=300)
    return Result(seconds, "s", details=details)
