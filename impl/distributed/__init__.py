"""Multi-process runs on ``torch.distributed``: the one launcher projects 21, 23 and 24 share.

Two ways in, one process group:
- ``torchrun`` (what users run, one or several nodes): each process calls ``init_from_env()``, which
  reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and joins the group torchrun set up (NCCL on GPUs,
  gloo on CPU);
- ``spawn(fn, world_size)`` (tests and benchmarks on one machine): starts ``world_size`` fresh
  processes with ``torch.multiprocessing``, on a free loopback port, gloo on CPU, one thread per rank,
  runs ``fn(rank, world_size, *args)`` in each and returns what every rank returned, rank by rank.

No process protocol of our own: ranks talk only through ``torch.distributed`` collectives.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: its rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the rendezvous port of ``spawn``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """NCCL where CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 300) -> RankInfo:
    """Join the process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); on CUDA each process takes GPU ``LOCAL_RANK``.

    Raises ``RuntimeError`` naming the missing variables when started without torchrun."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"not started by torchrun: {', '.join(missing)} unset; run e.g. "
                           "`torchrun --standalone --nproc-per-node 2 -m <module> ...`")
    backend = backend or default_backend()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return RankInfo(rank, world, device)


def trim_allocator() -> None:
    """Make glibc serve every block of 64 KiB or more from its own mapping, returned to the OS on free
    (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``), so the resident set follows the live tensors: what
    ``harness.measure.peak_memory_bytes`` does for single-process memory claims."""
    import ctypes

    if ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024) != 1:
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) refused: not glibc")


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the process that spawned it dies (a bench worker killed on a
    timeout), so no orphaned rank waits out its collective timeout."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_main(rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, threads: int,
               out_dir: str, args: tuple[Any, ...], timeout_s: float, trim: bool) -> None:
    """Body of one spawned rank: set up the group, run ``fn``, save its result (or its traceback)."""
    _die_with_parent()
    if trim:
        trim_allocator()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        info = init_from_env(backend, timeout_s)
        try:
            result = fn(info.rank, info.world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # the parent re-raises it with this rank's name
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


class RankError(RuntimeError):
    """A spawned rank raised: the message carries each failing rank's traceback."""


def spawn(fn: Callable[..., Any], world_size: int = 2, *args: Any, backend: str = "gloo", threads: int = 1,
          timeout_s: float = 300, trim: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined in one process
    group (``backend`` on a free loopback port, ``threads`` torch threads per rank) and return each
    rank's return value, in rank order. ``fn`` must be importable (a module-level function) and its
    arguments and return values picklable (tensors are). A rank that raises makes ``spawn`` raise
    ``RankError`` with that rank's traceback; a collective that never completes fails after ``timeout_s``.
    ``trim=True`` calls ``trim_allocator()`` first in every rank (for per-rank peak memory,
    ``resident_peak_bytes``)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="handson-ranks-") as out_dir:
        try:
            mp.start_processes(_rank_main, args=(fn, world_size, free_port(), backend, threads, out_dir, args,
                                                 timeout_s, trim),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessRaisedException:
            pass  # the saved traceback below says more than torch's summary
        except mp.ProcessExitedException as exc:
            raise RankError(f"a rank died: {exc}") from None
        results, errors = [], []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                errors.append(f"rank {rank}: left no result")
                continue
            saved = torch.load(path, weights_only=False)
            if saved["ok"]:
                results.append(saved["result"])
            else:
                errors.append(f"rank {rank}:\n{saved['error']}")
        if errors:
            raise RankError("\n".join(errors))
        return results


def resident_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` in this process and return ``(its result, peak memory above the start in bytes)``:
    ``torch.cuda.max_memory_allocated`` on CUDA, else the resident-set high-water mark (VmHWM, reset
    through ``/proc/self/clear_refs``). Each rank calls it on itself, so a multi-rank run reports one
    peak per rank."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current VmRSS
    base = _vm_kib("VmHWM:")
    result = fn()
    return result, (_vm_kib("VmHWM:") - base) * 1024


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")
