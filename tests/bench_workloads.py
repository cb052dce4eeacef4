"""Workloads for the harness's own tests (tests/test_bench_runs.py): each produces one outcome for real:
a figure, a hang, a killed worker, a killed memory subprocess, a degenerate figure, an absent component."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from harness.measure import Context, NotApplicable, Result, peak_memory_bytes


def five(ctx: Context) -> Result:
    return Result(value=5.0, unit="x")


def five_hundred(ctx: Context) -> Result:
    return Result(value=500.0, unit="x")


def record_device(ctx: Context) -> Result:
    """Appends the device it was given to $BENCH_TEST_LOG; the figure is 1."""
    with open(os.environ["BENCH_TEST_LOG"], "a") as f:
        f.write(ctx.device + "\n")
    return Result(value=1.0)


def not_a_number(ctx: Context) -> Result:
    return Result(value=float("nan"))


def hangs(ctx: Context) -> Result:
    time.sleep(3600)
    return Result(value=1.0)


def kills_its_process(ctx: Context) -> Result:
    os.kill(os.getpid(), signal.SIGKILL)
    return Result(value=1.0)


def absent_component(ctx: Context) -> Result:
    raise NotApplicable("no container engine on this machine")


def slow_one_second(ctx: Context) -> Result:
    time.sleep(1.0)
    marker = os.environ.get("BENCH_TEST_LOG")
    if marker:
        Path(marker).open("a").write("measured\n")
    return Result(value=2.0)


def suicide_setup(device: str = "cpu"):
    """Peak-memory setup whose measured call dies the way an OOM-killed worker does."""
    return lambda: os.kill(os.getpid(), signal.SIGKILL)


def nothing_setup(device: str = "cpu"):
    """Peak-memory setup whose measured call allocates nothing: a peak of 0 is degenerate."""
    return lambda: None


def memory_worker_killed(ctx: Context) -> Result:
    return Result(value=peak_memory_bytes("tests.bench_workloads:suicide_setup"))


def zero_peak(ctx: Context) -> Result:
    return Result(value=peak_memory_bytes("tests.bench_workloads:nothing_setup"))


def _rank_sum(rank: int, world: int) -> float:
    import torch.distributed as dist

    t = torch.tensor([2.5])
    dist.all_reduce(t)
    return t.item()


def spawns_ranks(ctx: Context) -> Result:
    """A multi-rank workload (P21, P23, P24): the bench's worker starts two gloo ranks."""
    from impl.distributed import spawn

    return Result(value=min(spawn(_rank_sum, 2)), unit="x")
