"""Measurement rules (DESIGN.md): interleaved A/B timing in one process, median + IQR,
peak memory in a fresh subprocess, and the environment every result records.

Workloads in ``benchmarks/workloads`` call these; nothing here knows about specs.
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


class NotApplicable(Exception):  # noqa: N818 (an outcome, not an error)
    """Raised by a workload when a component it needs is absent on this machine (a second GPU, a
    container engine, a browser): the claim's verdict is n/a with ``reason``. A missing Python
    package is not this: it stays an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class MeasurementError(RuntimeError):
    """A measurement that cannot be trusted: a peak <= 0, a time <= 0, NaN, a worker killed by a signal."""


def require_positive(name: str, value: float) -> float:
    """``value`` if it is a finite number > 0, else ``MeasurementError`` naming ``name``."""
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) or value <= 0:
        raise MeasurementError(f"degenerate measurement: {name} = {value!r} (must be a finite number > 0)")
    return value


@dataclass
class Context:
    """What a workload is told: quick mode (CI-sized) or full, and the device it runs on."""

    quick: bool = False
    device: str = "cpu"
    threads: int = 0


@dataclass
class Plot:
    """One figure for the project page: x values and one or more named series."""

    title: str
    x: list[float] | list[str]  # strings label the groups of a bar chart
    series: dict[str, list[float]]
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    kind: str = "line"  # "line" or "bar"


@dataclass
class Image:
    """A picture a workload took (a browser screenshot): PNG bytes, base64 in results.json so a stored run is
    self-contained; the report writes it beside the plots."""

    title: str
    png_base64: str

    @classmethod
    def from_png(cls, title: str, png: bytes) -> Image:
        """Wrap PNG bytes; anything that is not a PNG is refused (a screenshot call that returned an error page)."""
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise MeasurementError(f"image {title!r}: not PNG data (starts with {png[:8]!r})")
        return cls(title, base64.b64encode(png).decode("ascii"))

    def png(self) -> bytes:
        return base64.b64decode(self.png_base64)


@dataclass
class Result:
    """A workload's answer: the claim's metric value, its spread, and what explains it."""

    value: float
    unit: str = ""
    spread: tuple[float, float] | None = None  # (q1, q3) of the per-round metric
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    text: str = ""  # e.g. a generated sample, shown verbatim on the project page
    images: list[Image] = field(default_factory=list)  # e.g. a screenshot of the UI under test

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for results.json."""
        out = asdict(self)
        out["spread"] = list(self.spread) if self.spread else None
        return out


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of a non-empty list."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds per call for each named function, one entry per round (same round order)."""

    seconds: dict[str, list[float]]

    def median_s(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, slow: str, fast: str) -> tuple[float, tuple[float, float]]:
        """Median of per-round ratios time(slow)/time(fast), with its (q1, q3)."""
        ratios = [a / b for a, b in zip(self.seconds[slow], self.seconds[fast], strict=True)]
        q1, med, q3 = quartiles(ratios)
        return med, (q1, q3)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    min_time_s: float = 0.0,
) -> Timings:
    """Time each function once per round, alternating A, B, A, B ... after ``warmup`` calls each.

    Interleaving puts both sides under the same machine noise (thermal, other load). With
    ``min_time_s`` a call that is too short is repeated within the round and averaged.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    repeats = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        _sync(device)
        once = time.perf_counter() - start
        repeats[name] = max(1, int(min_time_s / once) if once > 0 else 1)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            n = repeats[name]
            start = time.perf_counter()
            for _ in range(n):
                fns[name]()
            _sync(device)
            seconds[name].append(require_positive(f"time of {name!r}", (time.perf_counter() - start) / n))
    return Timings(seconds)


_PEAK_SCRIPT = """
import ctypes, importlib, json, sys
allocator, measure = sys.argv[3], sys.argv[4]
if allocator == "trim":
    # glibc serves every block of 64 KiB or more from its own mapping, returned to the OS on free,
    # so the resident set follows the live tensors (M_MMAP_THRESHOLD = -3 in mallopt)
    if ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) != 1:
        raise SystemExit("mallopt(M_MMAP_THRESHOLD) refused: not glibc; measure with allocator='default'")
def _rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field + " not found in /proc/self/status")
def _rss_peak_kib():
    return _rss_kib("VmHWM:")
mod, _, name = sys.argv[1].partition(":")
fn = getattr(importlib.import_module(mod), name)
kwargs = json.loads(sys.argv[2])
setup = fn(**kwargs)            # builds inputs, returns the thing to measure
import torch
device = kwargs.get("device", "cpu")
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kept = setup(); torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() if measure == "peak" else torch.cuda.memory_allocated()) - base
else:
    open("/proc/self/clear_refs", "w").write("5")   # resets VmHWM to the current RSS
    base = _rss_peak_kib() * 1024
    kept = setup()                                    # what the call returns stays alive ("held")
    peak = (_rss_peak_kib() if measure == "peak" else _rss_kib("VmRSS:")) * 1024 - base
print("PEAK_BYTES", json.dumps(peak))
"""

def exit_reason(returncode: int | None) -> str:
    """How a child process ended: "killed by SIGKILL (...)" for a signal, else "exited with code N"."""
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (the OOM killer sends SIGKILL when memory runs out)"
                                      if name == "SIGKILL" else "")
    return f"exited with code {returncode}"


ALLOCATORS = ("trim", "default")
MEASURES = ("peak", "held")


def peak_memory_bytes(
    target: str, *, allocator: str = "trim", measure: str = "peak", timeout_s: float = 600, **kwargs: Any
) -> int:
    """Peak memory, in bytes above the baseline, of one call measured in a fresh subprocess.

    ``target`` is ``module:function``; the function receives ``kwargs`` (JSON-able), builds its
    inputs and returns a zero-argument callable: only that call is measured. On CPU the peak
    is the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs); on CUDA
    it is ``max_memory_allocated``. ``allocator="trim"`` (every memory claim's judged figure) makes
    glibc return freed blocks of 64 KiB or more to the OS, so the resident set follows the live
    tensors; ``"default"`` keeps glibc's own policy, whose fragmented heap also counts memory torch
    has freed. ``measure="held"`` reads the resident memory still held after the call, with the
    object it returned alive (e.g. a model built and converted), instead of the peak during it.
    A figure <= 0 or a worker killed by a signal (the OOM killer's SIGKILL) raises
    ``MeasurementError`` naming it.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK_SCRIPT), target, json.dumps(kwargs), allocator,
         measure],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=os.getcwd(),
    )
    if proc.returncode < 0:
        raise MeasurementError(f"peak-memory worker for {target} {kwargs} was {exit_reason(proc.returncode)}")
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_BYTES "):
            peak = int(json.loads(line.split(" ", 1)[1]))
            require_positive(f"peak memory of {target} {kwargs}", peak)
            return peak
    raise MeasurementError(
        f"peak-memory subprocess for {target} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def peak_sweep(
    target: str, methods: list[str], lengths: list[int], *, device: str = "cpu", allocator: str = "trim",
    key: str = "method", **kwargs: Any,
) -> dict[str, list[int]]:
    """Peak bytes of each method at each length, each in a fresh subprocess:
    ``target(**{key: method, "seq_len": n, "device": device, **kwargs})``, method by method."""
    return {m: [peak_memory_bytes(target, allocator=allocator, **{key: m, "seq_len": n, "device": device}, **kwargs)
                for n in lengths]
            for m in methods}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """Current commit hash, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Everything a result must record: commit, date, device, CPU, cores, threads, versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_kind": "cuda" if cuda else "cpu",
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "platform": platform.platform(),
    }
