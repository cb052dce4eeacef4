"""Mutants of the deployment (project 29): each is the real Dockerfile or compose project with one usual
mistake made, and the properties of tests/cases/docker.py must reject every one."""

from __future__ import annotations

import copy
import re

from impl.docker import deployment


def _dockerfile(pattern: str, replacement: str, flags: int = 0) -> str:
    text = deployment.DOCKERFILE.read_text()
    mutated, n = re.subn(pattern, replacement, text, flags=flags)
    assert n, f"mutant pattern {pattern!r} matches nothing in the Dockerfile: update the mutant"
    return mutated


def runs_as_root(build_args=None):
    return deployment.image(build_args, _dockerfile(r"^USER .*\n", "", re.M))


def no_healthcheck(build_args=None):
    return deployment.image(build_args, _dockerfile(r"^HEALTHCHECK .*\\\n.*\n", "", re.M))


def latest_base_image(build_args=None):
    return deployment.image(build_args, _dockerfile(r"python:3\.11-slim-bookworm", "python:latest"))


def untagged_base_image(build_args=None):
    return deployment.image(build_args, _dockerfile(r"python:3\.11-slim-bookworm", "python"))


def single_stage(build_args=None):
    """Everything in one stage: the runtime stage's FROM and its COPY --from lines gone."""
    text = _dockerfile(r"^FROM \S+ AS runtime\n", "", re.M)
    text = re.sub(r"^COPY --from=builder .*\n", "", text, flags=re.M)
    return deployment.image(build_args, text)


def runtime_on_another_python(build_args=None):
    """A slimmer-looking runtime base whose interpreter is not the one the venv was made with."""
    return deployment.image(build_args, _dockerfile(r"^FROM \$\{PYTHON_IMAGE\} AS runtime",
                                                    "FROM python:3.12-slim-bookworm AS runtime", re.M))


def pip_in_runtime(build_args=None):
    """The runtime stage installs the project itself (compilers and caches come along)."""
    text = _dockerfile(r"^WORKDIR /app\nUSER", "WORKDIR /app\nRUN pip install --no-cache-dir -e .\nUSER", re.M)
    return deployment.image(build_args, text)


def cache_not_a_volume(build_args=None):
    return deployment.image(build_args, _dockerfile(r"^VOLUME .*\n", "", re.M))


def api_on_loopback(build_args=None):
    return deployment.image(build_args, _dockerfile(r'"--host", "0\.0\.0\.0"', '"--host", "127.0.0.1"'))


def health_on_another_port(build_args=None):
    return deployment.image(build_args, _dockerfile(r"HEALTH_URL=http://127\.0\.0\.1:8000/",
                                                    "HEALTH_URL=http://127.0.0.1:8080/"))


def _project(files, env, change):
    proj = copy.deepcopy(deployment.project(files, env))
    change(proj["services"], proj)
    return proj


def workers_without_healthcheck(files, env):
    def change(s, _):
        for name in ("api-1", "api-2"):
            del s[name]["healthcheck"]
    return _project(files, env, change)


def router_before_workers_healthy(files, env):
    def change(s, _):
        for dep in s["router"]["depends_on"].values():
            dep["condition"] = "service_started"
    return _project(files, env, change)


def workers_healthy_before_model_loaded(files, env):
    def change(s, _):
        for name in ("api-1", "api-2"):
            s[name]["environment"]["HEALTH_URL"] = "http://127.0.0.1:8000/health"
    return _project(files, env, change)


def one_worker(files, env):
    def change(s, _):
        s["router"]["command"] = s["router"]["command"][:-2]  # the last --worker URL dropped
    return _project(files, env, change)


def ui_bypasses_router(files, env):
    def change(s, _):
        command = s["ui"]["command"]
        command[command.index("--api") + 1] = "http://api-1:8000"
    return _project(files, env, change)


def cache_in_container(files, env):
    """The second worker keeps its model in the container's layer: lost with it, rebuilt on every start."""
    def change(s, _):
        s["api-2"]["volumes"] = []
    return _project(files, env, change)


def gpu_not_reserved(files, env):
    def change(s, _):
        for service in s.values():
            service.pop("deploy", None)
    return _project(files, env, change)


def gpu_image_built_for_cpu(files, env):
    def change(s, _):
        for service in s.values():
            service["build"]["args"]["DEVICE"] = "cpu"
    return _project(files, env, change)


def api_key_not_passed(files, env):
    def change(s, _):
        for name in ("api-1", "api-2"):
            s[name]["environment"].pop("SERVING_API_KEY", None)
    return _project(files, env, change)


def workers_before_model_built(files, env):
    def change(s, _):
        for name in ("api-1", "api-2"):
            s[name].pop("depends_on", None)
    return _project(files, env, change)


def image_pulled_from_registry(files, env):
    """compose's default policy: look the tag up in a registry first, where anyone may have published it."""
    def change(s, _):
        for service in s.values():
            service.pop("pull_policy", None)
    return _project(files, env, change)
