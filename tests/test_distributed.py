"""The shared launcher (impl.distributed): real gloo process groups on loopback, 2 CPU ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from impl.distributed import RankError, init_from_env, resident_peak_bytes, spawn


def _all_reduce_rank(rank: int, world: int, scale: float) -> dict:
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t.item(), "threads": torch.get_num_threads()}


def _failing_rank(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one refuses")
    dist.barrier()


def _peak_rank(rank: int, world: int) -> int:
    _, peak = resident_peak_bytes(lambda: torch.ones(4 << 20).sum())  # a 16 MiB tensor, briefly alive
    return peak


def test_spawn_returns_each_ranks_value_after_a_real_all_reduce():
    out = spawn(_all_reduce_rank, 2, 2.0)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and o["sum"] == 6.0 and o["threads"] == 1 for o in out)


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankError, match="rank one refuses"):
        spawn(_failing_rank, 2, timeout_s=30)


def test_each_rank_measures_its_own_peak():
    peaks = spawn(_peak_rank, 2, trim=True)
    assert all(16 << 20 <= p < 64 << 20 for p in peaks), peaks


def test_init_from_env_names_what_torchrun_would_have_set(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT unset"):
        init_from_env()
