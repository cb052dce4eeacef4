"""Unit tests of project 24: the balanced split, stage modules that compose to the full model, the textbook
schedules, the simulator's deadlock detection and bubble arithmetic, activations held per schedule on real
ranks, and the torchrun CLI on 2 gloo ranks."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.distributed import spawn
from impl.pipeline_parallelism.partition import balanced_cuts, build_stages, parameter_costs, partition
from impl.pipeline_parallelism.runtime import pipeline_step, split_micro_batches
from impl.pipeline_parallelism.schedules import (
    Action,
    Deadlock,
    Event,
    bubble_fraction,
    gpipe,
    ideal_bubble,
    one_f_one_b,
    simulate,
)
from tests.cases.pipeline_parallelism import tiny_gpt, token_batch


def _brute_force_best(costs: list[float], n_stages: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=9), st.integers(1, 9))
def test_balanced_cuts_minimize_the_slowest_stage_over_every_contiguous_split(costs, n_stages):
    if n_stages > len(costs):
        with pytest.raises(ValueError, match="non-empty stages"):
            balanced_cuts(costs, n_stages)
        return
    ranges = balanced_cuts(costs, n_stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
    assert max(sum(costs[a:b]) for a, b in ranges) == _brute_force_best(costs, n_stages)


def test_partition_keeps_the_embedding_with_the_first_block_and_the_head_with_the_last():
    model = tiny_gpt(0, n_layer=4)
    costs = [100.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # a huge embedding: stage 0 gets only block 0
    assert partition(model, 2, costs) == [(0, 1), (1, 4)]
    assert partition(model, 2, [1.0, 1.0, 1.0, 1.0, 1.0, 100.0]) == [(0, 3), (3, 4)]
    assert partition(model, 4, parameter_costs(model)) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="at least as many blocks"):
        partition(model, 5)


@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_stages_run_one_after_another_compute_the_full_models_logits(n_stages):
    model = tiny_gpt(3, n_layer=3)
    idx, _ = token_batch(3, 2, 11)
    stages = build_stages(model, partition(model, n_stages))
    x = idx
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, model(idx), rtol=1e-12, atol=1e-12)
    names = set().union(*(dict(s.named_parameters()) for s in stages))
    expected = set(dict(model.named_parameters()))
    assert names == (expected | {"lm_head.weight"} if n_stages > 1 else expected)


def test_the_last_stage_keeps_its_own_copy_of_the_tied_embedding():
    model = tiny_gpt(4, n_layer=2)
    first, last = build_stages(model, partition(model, 2))
    assert first.tied and last.tied
    assert last.lm_head.weight is not first.wte.weight
    assert torch.equal(last.lm_head.weight, first.wte.weight)


def test_schedules_are_the_textbook_orders_at_p2_m4():
    F, B = (lambda i: Action("F", i)), (lambda i: Action("B", i))
    assert gpipe(2, 4)[0] == [F(0), F(1), F(2), F(3), B(3), B(2), B(1), B(0)]
    assert one_f_one_b(2, 4) == [[F(0), F(1), B(0), F(2), B(1), F(3), B(2), B(3)],
                                 [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3)]]


def test_simulate_reports_a_deadlock_and_a_backward_before_its_forward():
    F, B = (lambda i: Action("F", i)), (lambda i: Action("B", i))
    with pytest.raises(Deadlock):  # rank 0 waits for B0's gradient, rank 1 for F1's activation first
        simulate([[F(0), B(0), F(1), B(1)], [F(1), F(0), B(0), B(1)]])
    with pytest.raises(ValueError, match="before its own F0"):
        simulate([[B(0), F(0)]])


def test_bubble_fraction_is_idle_time_over_the_common_span():
    events = [Event(0, "F", 0, 0.0, 1.0), Event(0, "B", 0, 3.0, 4.0), Event(1, "F", 0, 1.0, 2.0),
              Event(1, "B", 0, 2.0, 3.0)]
    assert bubble_fraction(events) == pytest.approx(0.5)  # each rank busy 2 of the span of 4
    assert ideal_bubble(2, 4) == pytest.approx(0.2)


def test_split_micro_batches_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="equal micro-batches"):
        split_micro_batches(torch.zeros(6, 3), 4)


class _HeldBytes:
    """Bytes of activations autograd holds for backward (saved tensors that are not parameters)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.live = self.peak = 0

    def pack(self, t):
        n = 0 if t.untyped_storage().data_ptr() in self.params else t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Held(t, n, self)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, tensor, n, owner):
        self.tensor, self.n, self.owner = tensor, n, owner

    def __del__(self):
        self.owner.live -= self.n


def _rank_held_activations(rank: int, world: int) -> dict[str, int]:
    model = tiny_gpt(5, n_layer=2)
    idx, targets = token_batch(5, 8, 16)
    out = {}
    for schedule in ("gpipe", "1f1b"):
        stage = build_stages(model, partition(model, world))[rank]
        held = _HeldBytes(stage.parameters())
        with torch.autograd.graph.saved_tensors_hooks(held.pack, held.unpack):
            result = pipeline_step(stage, schedule, idx, targets, 8)
        assert len(result["events"]) == 16
        out[schedule] = held.peak
    return out


def test_1f1b_holds_fewer_activations_than_gpipe_on_real_ranks():
    per_rank = spawn(_rank_held_activations, 2, timeout_s=120)
    for rank, held in enumerate(per_rank):
        # m = 8: GPipe holds all 8 micro-batches' activations, 1F1B at most p - rank = 2 - rank of them
        assert held["1f1b"] * 8 <= held["gpipe"] * (2 - rank) * 1.01, (rank, held)
        assert held["1f1b"] > 0


def test_torchrun_cli_trains_with_identical_tied_copies():
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "impl.pipeline_parallelism", "--schedule", "1f1b", "--micro-batches", "4", "--steps", "2",
           "--seq-len", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"rank 1: stage 1 blocks 2\.\.3", done.stdout), done.stdout
    summary = re.search(r"1f1b, p = 2, m = 4: losses ([\d.]+), ([\d.]+); bubble fraction ([\d.]+)", done.stdout)
    assert summary, done.stdout
    assert 0 <= float(summary.group(3)) < 1
    assert "max |difference| 0" in done.stdout, done.stdout  # the two copies got the same summed gradient
