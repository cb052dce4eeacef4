"""Cases and properties for project 29: the image and the compose project, read from their files.

``image_is_deployable`` and ``compose_is_deployable`` state what a deployment must be (two stages, an
unprivileged user, pinned bases, a health check, the cache on a volume; every long-running service health-
checked and started only after what it needs is healthy, the balancer in front of >= 2 workers, GPUs
reserved in the GPU variant). The mutants (tests/mutants/docker.py) are the usual ways to get it wrong.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from harness.cases import Cases
from impl.docker import deployment

images = Cases(edge=[
    {"build_args": {}, "id": "cpu-default"},
    {"build_args": {"DEVICE": "cuda"}, "id": "cuda-build-arg"},
])

projects = Cases(edge=[
    {"files": ["compose.yaml"], "env": {}, "id": "cpu"},
    {"files": ["compose.yaml", "compose.gpu.yaml"], "env": {}, "id": "gpu-override"},
    {"files": ["compose.yaml"], "env": {"HANDSON_MODEL": "/cache/tiny", "API_PORT": "18000", "UI_PORT": "17860",
                                        "API_KEY": "sk-test"}, "id": "settings-from-the-environment"},
])


def _option(argv: list[str], name: str) -> str | None:
    """The value after ``name`` in ``argv`` (None when absent)."""
    return argv[argv.index(name) + 1] if name in argv else None


def image_is_deployable(fn, build_args: dict[str, str]) -> None:
    """The image ``fn(build_args=...)`` describes lints clean and is built to be deployed."""
    img = fn(build_args=build_args)
    findings = deployment.hadolint(img.text)
    assert not findings, "hadolint: " + "; ".join(f"{f['code']} line {f['line']}: {f['message']}" for f in findings)
    names = [s.name for s in img.stages[:-1]]
    assert len(img.stages) >= 2 and img.copied_from, "one stage: the runtime image would carry pip and its caches"
    assert all(src in names for src in img.copied_from), f"COPY --from={img.copied_from} names no earlier stage"
    builders = {s.name: s.base for s in img.stages[:-1]}
    assert all(builders[src] == img.stages[-1].base for src in img.copied_from), \
        "the runtime stage's base differs from the builder's: the copied venv links to the builder's interpreter"
    assert not any(k == "RUN" and "pip install" in rest for k, rest in img.stages[-1].instructions), \
        "the runtime stage installs packages: installing belongs in the builder"
    for stage in img.stages:
        repo, _, tag = stage.base.rpartition(":")
        pinned = "@sha256:" in stage.base or (repo and "/" not in tag and tag not in ("", "latest"))
        assert pinned, f"base image {stage.base!r} is not pinned to a version tag"
    assert img.user and img.user.split(":")[0] not in ("root", "0"), f"the container runs as root (USER {img.user})"
    assert img.healthcheck, "no HEALTHCHECK: compose and orchestrators cannot tell a hung server from a live one"
    argv = img.entrypoint + img.cmd
    assert argv[:4] == ["python", "-m", "impl.serving", "api"], f"the image does not run the API: {argv}"
    assert _option(argv, "--host") == "0.0.0.0", "the API listens on loopback only: unreachable from outside"
    port = int(_option(argv, "--port") or 0)
    assert port in img.exposed, f"port {port} is not EXPOSEd ({img.exposed})"
    health = urlsplit(img.env.get("HEALTH_URL", ""))
    assert "HEALTH_URL" in " ".join(img.healthcheck) and health.path == "/health" and health.port == port, \
        f"the health check does not ask the API's /health on port {port}: {img.env.get('HEALTH_URL')}"
    cache = img.env.get("HANDSON_CACHE")
    assert cache and cache in img.volumes, f"the model cache {cache!r} is not a VOLUME ({img.volumes})"


def _health_enabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable") and check["test"][0] != "NONE"


def compose_is_deployable(fn, files: list[str], env: dict[str, str]) -> None:
    """The project ``fn(files=..., env=...)`` describes starts in a safe order and balances >= 2 workers."""
    proj = fn(files=files, env=env)
    services: dict[str, dict[str, Any]] = proj["services"]
    gpu = "compose.gpu.yaml" in files
    routers = [n for n, s in services.items() if (s.get("command") or [""])[0] == "router"]
    assert len(routers) == 1, f"expected one router service, found {routers}"
    router = services[routers[0]]
    workers = [urlsplit(u).hostname for u in router["command"] if u.startswith("http://")]
    assert len(workers) >= 2, f"the router balances {len(workers)} worker(s): {workers}"
    model = env.get("HANDSON_MODEL", "chat")
    builders: set[str] = set()
    for name, service in services.items():
        if service.get("restart") != "no":  # long-running: must say when it is healthy
            assert _health_enabled(service), f"service {name} has no health check"
    for w in workers:
        assert w in services, f"the router names worker {w}, which is no service"
        command = services[w].get("command") or []
        assert command[:1] == ["api"] and _option(command, "--model") == model, \
            f"worker {w} does not serve the model {model!r}: {command}"
        assert "/ready" in services[w].get("environment", {}).get("HEALTH_URL", ""), \
            f"worker {w} is healthy before its model is loaded (health check not on /ready)"
        cond = (router.get("depends_on") or {}).get(w, {}).get("condition")
        assert cond == "service_healthy", f"the router starts before worker {w} is healthy (condition {cond})"
        builds = [d for d, c in (services[w].get("depends_on") or {}).items()
                  if c.get("condition") == "service_completed_successfully"]
        assert builds, f"worker {w} starts before the model is built"
        builders.update(builds)
        for b in builds:
            assert "impl.zoo build" in " ".join(services[b].get("command") or []), f"{b} does not build the model"
    uis = [n for n, s in services.items() if (s.get("entrypoint") or [])[-1:] == ["impl.ui"]]
    assert len(uis) == 1, f"expected one UI service, found {uis}"
    ui = services[uis[0]]
    assert urlsplit(_option(ui["command"], "--api") or "").hostname == routers[0], "the UI bypasses the balancer"
    assert (ui.get("depends_on") or {}).get(routers[0], {}).get("condition") == "service_healthy", \
        "the UI starts before the API is healthy"
    key = env.get("API_KEY", "")
    assert all(services[w]["environment"].get("SERVING_API_KEY", "") == key for w in workers) and \
        ui["environment"].get("SERVING_API_KEY", "") == key, "the API key does not reach the workers and the UI alike"
    for name, port in ((routers[0], env.get("API_PORT", "8000")), (uis[0], env.get("UI_PORT", "7860"))):
        assert any(str(p).startswith(f"{port}:") for p in services[name].get("ports", [])), \
            f"{name} is not published on port {port}"
    cache = deployment.image().env["HANDSON_CACHE"]
    for name in (*workers, *sorted(builders)):
        mounts = [v for v in services[name].get("volumes", []) if str(v).endswith(f":{cache}")]
        assert mounts and mounts[0].split(":")[0] in (proj.get("volumes") or {}), \
            f"{name} does not keep the model cache {cache} on a named volume"
    device = "cuda" if gpu else "cpu"
    for name, service in services.items():
        assert service.get("pull_policy") == "build", \
            f"{name} may pull {service.get('image')} from a registry instead of building it here"
        arg = service.get("build", {}).get("args", {}).get("DEVICE")
        assert arg == device and service["image"].endswith(f":{device}"), \
            f"{name}: build arg DEVICE={arg}, image {service.get('image')} in the {device} variant"
        reserved = (service.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", [])
        wants_gpu = gpu and name in workers
        has_gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in reserved)
        assert has_gpu == wants_gpu, f"{name}: GPU reserved {has_gpu}, expected {wants_gpu}"
