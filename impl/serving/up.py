"""One command for the whole deployment: the router, its supervised API workers and the chat UI.

    python -m impl.serving up                      # chat (else bpe-base), 2 workers, API :8000, UI :7860
    python -m impl.serving up --model PATH --workers 3 --port 9000 --ui-port 9001 --api-key secret
    python -m impl.serving up -- --max-num-seqs 32 --prefix-caching   # after '--': passed to every worker

It starts ``python -m impl.serving router --workers N --model M`` (which spawns and restarts the workers)
and, once the router answers ``/ready``, ``python -m impl.ui --api ROUTER_URL``; it prints the URLs only
when both answer, so "ready" means a user can chat. Ctrl-C or SIGTERM stops everything: each child is
also tied to this process with PR_SET_PDEATHSIG, so even a SIGKILL of this command leaves no server behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from impl.serving.__main__ import default_model
from impl.serving.router import _die_with_parent

ROUTER_LINE = re.compile(r"routing on (http://\S+)")


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    """Poll ``url`` until it answers 200; raise when ``proc`` dies or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.25)
    raise RuntimeError(f"{what} was not ready at {url} after {timeout_s:.0f} s")


def echo(proc: subprocess.Popen, found: dict, pattern: re.Pattern, event: threading.Event) -> None:
    """Copy a child's output to ours; note the first URL matching ``pattern``."""
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = pattern.search(line)
        if m and "url" not in found:
            found["url"] = m.group(1).rstrip("/")
            event.set()
    event.set()


def spawn(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            preexec_fn=_die_with_parent)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each child (the router stops its workers), SIGKILL what is left after 15 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: Sequence[str] | None = None, prog: str = "python -m impl.serving up") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Start the OpenAI-compatible API (a load-balancing "
                                "router over N model workers) and the Gradio chat UI with one command. "
                                "Arguments after '--' go to every 'api' worker.")
    p.add_argument("--model", default=None, help="model name or directory (default: chat if cached, else bpe-base)")
    p.add_argument("--workers", type=int, default=2, help="model workers behind the router (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="address the router and the UI listen on")
    p.add_argument("--port", type=int, default=8000, help="the API's (router's) port (default 8000)")
    p.add_argument("--ui-port", type=int, default=7860, help="the UI's port (default 7860)")
    p.add_argument("--no-ui", action="store_true", help="start the API only")
    p.add_argument("--api-key", default=os.environ.get("SERVING_API_KEY"),
                   help="require this key on the API; the UI is given it (default: $SERVING_API_KEY, else open). "
                        "It reaches the children through their environment, never their command line")
    p.add_argument("--ready-timeout", type=float, default=900, metavar="S",
                   help="seconds to wait for the model to load (default 900)")
    args, extra = p.parse_known_args(argv)
    worker_args = [a for a in extra if a != "--"]
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    model = args.model or default_model()
    if args.api_key:
        os.environ["SERVING_API_KEY"] = args.api_key  # inherited by the router, its workers and the UI

    procs: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        router = spawn([sys.executable, "-m", "impl.serving", "router", "--host", args.host, "--port",
                        str(args.port), "--workers", str(args.workers), "--model", model, "--", *worker_args])
        procs.append(router)
        found: dict = {}
        seen = threading.Event()
        threading.Thread(target=echo, args=(router, found, ROUTER_LINE, seen), daemon=True).start()
        seen.wait(60)
        if "url" not in found:
            raise RuntimeError(f"the router did not start (exit code {router.poll()})")
        api = found["url"]
        print(f"up: waiting for {args.workers} worker(s) to load {model} ...", flush=True)
        wait_http_ok(f"{api}/ready", args.ready_timeout, router, "the router")
        ui_url = None
        if args.no_ui:
            pass
        elif importlib.util.find_spec("impl.ui") is None:
            print("up: impl.ui is not installed here; serving the API only", flush=True)
        else:
            cmd = [sys.executable, "-m", "impl.ui", "--api", api, "--port", str(args.ui_port), "--host", args.host]
            ui = spawn(cmd)
            procs.append(ui)
            threading.Thread(target=echo, args=(ui, {}, ROUTER_LINE, threading.Event()), daemon=True).start()
            ui_url = f"http://{args.host}:{args.ui_port}"
            wait_http_ok(ui_url, 120, ui, "the UI")
        print(f"up: API ready at {api}/v1 (model {model}, {args.workers} workers)"
              + (f"; chat UI at {ui_url}" if ui_url else "") + "; Ctrl-C stops everything", flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        dead = next(proc for proc in procs if proc.poll() is not None)
        what = "the router" if dead is procs[0] else "the UI"
        print(f"up: {what} exited with code {dead.returncode}; stopping", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"up: {e}", file=sys.stderr, flush=True)
        sys.exit(1)  # the dispatcher in __main__ ignores return values
    finally:
        stop(procs)
