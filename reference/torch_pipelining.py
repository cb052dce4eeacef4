"""Peer for pipeline parallelism: ``torch.distributed.pipelining``'s ``PipelineStage`` run by its
``ScheduleGPipe`` / ``Schedule1F1B`` on the same stage split as ours. Shares no scheduling or communication
code with ``impl.pipeline_parallelism``: it takes one of our stage modules (the model split is what both
sides must agree on) and lets torch decide every send, receive, forward and backward.

The loss is the micro-batch mean cross-entropy; ``scale_grads=True`` makes torch divide the accumulated
gradients by the number of micro-batches, so they are the full batch mean's gradients. torch knows nothing
of the tied embedding / LM head copies on the first and last stage; this adapter sums their gradients with an
``all_reduce`` over a two-rank group, as Megatron-LM does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def _mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.flatten(0, 1).to(wide), targets.flatten())


def _sum_tied(stage: nn.Module, rank: int, world: int, group: dist.ProcessGroup) -> None:
    if rank in (0, world - 1):
        weight = stage.wte.weight if rank == 0 else stage.lm_head.weight
        dist.all_reduce(weight.grad, group=group)


def torch_pipeline_runner(stage: nn.Module, schedule: str, n_micro: int) -> Callable[..., list[float]]:
    """torch's schedule for this rank's ``stage``, built once: ``run(idx, targets)`` does one forward + backward
    of a batch (gradients accumulate, tied copies summed) and returns the last rank's m micro-batch losses
    ([] elsewhere). Reusing it skips torch's shape inference after the first step (what a timing wants)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    pipe_stage = PipelineStage(stage, rank, world, torch.device("cpu"))
    runner = _SCHEDULES[schedule](pipe_stage, n_microbatches=n_micro, loss_fn=_mean_cross_entropy,
                                  scale_grads=True)
    tied = getattr(stage, "tied", False) and world > 1
    group = dist.new_group([0, world - 1]) if tied else None  # every rank takes part in creating it

    def run(idx: torch.Tensor, targets: torch.Tensor) -> list[float]:
        losses: list[torch.Tensor] = []
        if world == 1:
            runner.step(idx, target=targets, losses=losses)
        elif rank == 0:
            runner.step(idx)
        elif rank == world - 1:
            runner.step(target=targets, losses=losses)
        else:
            runner.step()
        if tied:
            _sum_tied(stage, rank, world, group)
        return [float(v.detach()) for v in losses]

    return run


def torch_pipeline_step(stage: nn.Module, schedule: str, idx: torch.Tensor, targets: torch.Tensor,
                        n_micro: int) -> dict[str, Any]:
    """One forward + backward of ``idx`` / ``targets`` (B, T) through torch's pipeline on this rank (stage
    ``rank`` of ``world``). Returns ``{"losses": [m micro-batch losses] (last rank), "grads": {name:
    gradient}}`` like ``impl.pipeline_parallelism.runtime.pipeline_step``."""
    losses = torch_pipeline_runner(stage, schedule, n_micro)(idx, targets)
    grads = {name: p.grad.detach().clone() for name, p in stage.named_parameters() if p.grad is not None}
    return {"losses": losses, "grads": grads}
