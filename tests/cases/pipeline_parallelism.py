"""Cases and properties for project 24: schedule sizes (p stages, m micro-batches) for the schedule-validity
properties (pure: no processes), and small fp64 GPTs run through our pipeline on 2 gloo ranks, compared in the
same spawn with torch.distributed.pipelining on the same split and with one process computing the full batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from harness.cases import Cases
from impl.distributed import spawn
from impl.gpt.model import GPT, GPTConfig
from impl.pipeline_parallelism.partition import build_stage, partition
from impl.pipeline_parallelism.schedules import Deadlock, bubble_fraction, ideal_bubble, max_in_flight, simulate

# ------------------------------------------------------------------ schedules (no processes)

schedule_sizes = Cases(
    edge=[{"n_stages": p, "n_micro": m, "id": f"p{p}-m{m}"}
          for p, m in [(1, 1), (1, 3), (2, 1), (2, 4), (3, 2), (4, 4), (4, 8), (8, 3), (3, 7)]],
    strategy=st.builds(dict, n_stages=st.integers(1, 8), n_micro=st.integers(1, 16)),
)


def valid_with_ideal_bubble(fn: Callable, n_stages: int, n_micro: int) -> None:
    """Property: one action list per rank, each rank runs F and B of every micro-batch exactly once and each B
    after its own F, the schedule runs to the end without deadlock (sends asynchronous, receives blocking),
    and with unit-cost stages its bubble fraction is the textbook (p - 1) / (m + p - 1)."""
    schedule = fn(n_stages, n_micro)
    assert len(schedule) == n_stages, f"{len(schedule)} action lists for {n_stages} stages"
    for rank, actions in enumerate(schedule):
        for kind in ("F", "B"):
            mbs = sorted(a.mb for a in actions if a.kind == kind)
            assert mbs == list(range(n_micro)), f"rank {rank} runs {kind} of micro-batches {mbs}"
    try:
        events = simulate(schedule)
    except (Deadlock, ValueError) as e:
        raise AssertionError(str(e)) from e
    bubble, ideal = bubble_fraction(events), ideal_bubble(n_stages, n_micro)
    assert abs(bubble - ideal) < 1e-9, f"unit-cost bubble {bubble:.4f}, the schedule's ideal is {ideal:.4f}"


def holds_at_most_p_minus_rank(fn: Callable, n_stages: int, n_micro: int) -> None:
    """Property (1F1B): rank r never holds more than min(p - r, m) micro-batches' activations."""
    for rank, actions in enumerate(fn(n_stages, n_micro)):
        held = max_in_flight(actions)
        assert held <= min(n_stages - rank, n_micro), f"rank {rank} of {n_stages} holds {held} micro-batches"


# ------------------------------------------------------------------ real ranks: ours vs single process vs torch

WORLD = 2  # the ranks the tests run (2 CPU cores)


def tiny_gpt(seed: int, n_layer: int, n_embd: int = 32, vocab_size: int = 64, block_size: int = 16) -> GPT:
    """A random fp64 GPT (4 heads, tied embedding / LM head) for exact comparisons."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=4, n_embd=n_embd)
    return GPT(config).double()


def token_batch(seed: int, batch: int, length: int, vocab_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (batch, length) and their next-token targets."""
    ids = torch.randint(vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(seed + 1))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _rank_compare(rank: int, world: int, step: Callable, case: dict[str, Any]) -> dict[str, Any]:
    """In each rank: our pipeline (``step``) and torch's on fresh copies of this rank's stage, both schedules."""
    from reference.torch_pipelining import torch_pipeline_step  # imported by the ranks only: it takes seconds

    model = tiny_gpt(case["seed"], case["n_layer"])
    idx, targets = token_batch(case["seed"], case["batch"], case["length"])
    ranges = partition(model, world)
    out = {}
    for schedule in ("gpipe", "1f1b"):
        ours = step(build_stage(model, ranges, rank), schedule, idx, targets, case["n_micro"])
        theirs = torch_pipeline_step(build_stage(model, ranges, rank), schedule, idx, targets, case["n_micro"])
        out[schedule] = {"ours": {"losses": ours["losses"], "grads": ours["grads"]}, "torch": theirs}
    return out


def single_process(seed: int, n_layer: int, batch: int, length: int) -> dict[str, Any]:
    """The full batch's mean loss and every parameter's gradient in one process (the tied weight once, as
    ``wte.weight``; the last stage's copy ``lm_head.weight`` must get the same)."""
    model = tiny_gpt(seed, n_layer)
    idx, targets = token_batch(seed, batch, length)
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())  # fp64 throughout
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads["lm_head.weight"] = grads["wte.weight"]
    return {"loss": loss.item(), "grads": grads}


def _merged(per_rank: list[dict[str, Any]], schedule: str, side: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = per_rank[-1][schedule][side]["losses"]
    grads: dict[str, torch.Tensor] = {}
    for r in per_rank:
        grads.update(r[schedule][side]["grads"])
    return losses, grads


def _close_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), f"{what}: gradients of {sorted(set(want) ^ set(got))} missing or extra"
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert torch.allclose(got[name], want[name], rtol=1e-7, atol=1e-12), f"{what}: {name} off by {err:.3g}"


def matches_single_process_and_torch(fn: Callable, seed: int, n_layer: int, batch: int, length: int,
                                     n_micro: int) -> None:
    """Property: on 2 ranks, for GPipe and 1F1B, our pipeline's micro-batch losses average to the full batch's
    mean loss and its gradients (tied copies included) equal the single-process ones; and its losses and
    gradients equal torch.distributed.pipelining's (same split, same schedule), all in fp64."""
    case = {"seed": seed, "n_layer": n_layer, "batch": batch, "length": length, "n_micro": n_micro}
    per_rank = spawn(_rank_compare, WORLD, fn, case, timeout_s=120)
    single = single_process(seed, n_layer, batch, length)
    for schedule in ("gpipe", "1f1b"):
        losses, grads = _merged(per_rank, schedule, "ours")
        torch_losses, torch_grads = _merged(per_rank, schedule, "torch")
        assert len(losses) == n_micro, f"{schedule}: {len(losses)} micro-batch losses for m = {n_micro}"
        mean = sum(losses) / n_micro
        assert abs(mean - single["loss"]) < 1e-9, f"{schedule}: mean loss {mean} vs full batch {single['loss']}"
        _close_grads(grads, single["grads"], f"{schedule} vs single process")
        assert torch.allclose(torch.tensor(losses), torch.tensor(torch_losses), rtol=1e-9, atol=0), \
            f"{schedule}: losses {losses} vs torch's {torch_losses}"
        _close_grads(grads, torch_grads, f"{schedule} vs torch.distributed.pipelining")


def pipeline_case(seed: int, n_layer: int, batch: int, length: int, n_micro: int, id: str | None = None) -> dict:
    case = {"seed": seed, "n_layer": n_layer, "batch": batch, "length": length, "n_micro": n_micro}
    return case | ({"id": id} if id else {})


pipeline_runs = Cases(
    edge=[
        pipeline_case(0, 2, 4, 16, 2, id="m-equals-p"),
        pipeline_case(1, 3, 6, 9, 3, id="uneven-split-m3-odd-length"),
    ],
    strategy=st.builds(pipeline_case, seed=st.integers(0, 2**16), n_layer=st.integers(2, 4),
                       batch=st.sampled_from([4, 8]), length=st.integers(1, 16), n_micro=st.sampled_from([2, 4])),
)
