"""Real servers for tests and workloads: a ``python -m impl.serving ...`` subprocess on a free loopback port, or
an app on uvicorn in a thread of this process (still real HTTP on loopback, for apps built with test seams).

    with running_server(["api", "--model", str(tiny_dir)]) as url:      # "http://127.0.0.1:PORT"
        httpx.get(url + "/v1/models")

Both wait until ``/ready`` answers 200 and tear everything down on exit (the subprocess's whole process group,
so workers a router spawned go too).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

URL = re.compile(r"serving on (http://\S+)")


def wait_ready(url: str, timeout_s: float = 60.0, path: str = "/ready", proc: subprocess.Popen | None = None) -> None:
    """Poll ``url + path`` until it answers 200; RuntimeError (with the reason) after ``timeout_s``."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            r = httpx.get(url + path, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"{url}{path} not ready after {timeout_s} s: {last}")


@contextlib.contextmanager
def running_server(args: Sequence[str], timeout_s: float = 90.0, env: dict[str, str] | None = None,
                   log_path: str | Path | None = None) -> Iterator[str]:
    """Start ``python -m impl.serving *args`` (``--port 0`` and ``--threads 1`` added unless given), yield its
    base URL once ready, then stop it. Its stderr (the log) goes to ``log_path`` (default: a temp file)."""
    args = list(args)
    if "--port" not in args:
        args += ["--port", "0"]
    if args and args[0] == "api" and "--threads" not in args:
        args += ["--threads", "1"]
    log = open(log_path, "wb") if log_path else tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "impl.serving", *args], stdout=subprocess.PIPE, stderr=log,
                            env={**os.environ, **(env or {})}, start_new_session=True, text=True)
    try:
        url = read_url(proc, timeout_s)
        wait_ready(url, timeout_s, proc=proc)
        yield url
    finally:
        stop_process_group(proc)
        log.close()


def read_url(proc: subprocess.Popen, timeout_s: float, pattern: re.Pattern = URL) -> str:
    """The first URL ``proc`` prints that ``pattern`` captures (``serving on http://...``; the UI prints
    ``ui on http://...``); its stdout stays drained by a thread so it never blocks on a full pipe. An error
    with the last lines it printed when it exits first or prints none within ``timeout_s``."""
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = pattern.search(line)
            if m and not found:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2:4]} exited with code {proc.returncode} before printing its URL:\n"
                               + "".join(lines[-20:]))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[2:4]} printed no URL within {timeout_s} s:\n" + "".join(lines[-20:]))
        time.sleep(0.05)
    return found[0]


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s process group (a router's workers, a UI's threads), SIGKILL it after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def serving_in_thread(app, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread of this process; yield its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
