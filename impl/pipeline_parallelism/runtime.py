"""Executing a pipeline schedule on real ranks: one stage per rank, activations and gradients sent between
neighbours with ``torch.distributed`` point-to-point ops, a timeline of compute events recorded per rank.

Rank r runs the action list ``schedules.SCHEDULES[name](p, m)[r]`` in order:
- ``F(mb)``: receive mb's activation (B_mb, T, C) from rank r - 1 (blocking ``recv``; the first rank slices its
  token ids instead), run the stage, keep (input, output) for the backward, send the output to rank r + 1
  (``isend``: a send never blocks, so only a schedule whose receives cannot be satisfied deadlocks, exactly
  the case ``schedules.simulate`` reports). The last rank turns its logits into the micro-batch loss divided by
  m: summed over the m micro-batches, the gradients are those of the full batch's mean loss.
- ``B(mb)``: receive the gradient of mb's output from rank r + 1 (the last rank starts from its loss),
  backpropagate through the stage (gradients accumulate in ``.grad`` across micro-batches), send the gradient
  of mb's input to rank r - 1, and drop mb's saved activations.

Only the stage computations are timed (``time.perf_counter``, the same monotonic clock for every process of
one machine); waiting in ``recv`` is idle time, i.e. the bubble plus the transfer cost. On CUDA the stage runs
on its parameters' device and each event ends with a ``synchronize`` so that it times the kernels, not their
launch.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from impl.pipeline_parallelism.partition import StageModule
from impl.pipeline_parallelism.schedules import SCHEDULES, Event


def micro_loss(logits: torch.Tensor, targets: torch.Tensor, n_micro: int) -> torch.Tensor:
    """One micro-batch's share of the batch loss: its mean next-token cross-entropy divided by ``n_micro``
    (micro-batches are equal in size, so the m shares sum to the full batch's mean). Logits (B, T, V) in
    bf16 / fp16 are scored in fp32 (as ``lm_loss`` does), fp64 ones in fp64 (the exact checks)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide.flatten(0, 1), targets.flatten()) / n_micro


def reduce_tied_grads(stage: StageModule) -> None:
    """Sum the gradients of the tied embedding / LM head copies between the first rank (``wte``) and the last
    (``lm_head``): afterwards both hold the single-process tied weight's gradient. Every other rank, and a
    model without tie, does nothing."""
    if not stage.tied or not (stage.is_first or stage.is_last):
        return
    weight = stage.wte.weight if stage.is_first else stage.lm_head.weight
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    peer = stage.n_stages - 1 if stage.is_first else 0
    theirs = torch.empty_like(weight.grad)
    request = dist.isend(weight.grad.clone(), dst=peer)
    dist.recv(theirs, src=peer)
    request.wait()
    weight.grad += theirs  # a + b on one rank, b + a on the other: the same bits


def split_micro_batches(batch: torch.Tensor, n_micro: int) -> list[torch.Tensor]:
    """``batch`` (B, ...) cut into ``n_micro`` equal micro-batches along dim 0; B must be a multiple of m."""
    if batch.shape[0] % n_micro:
        raise ValueError(f"batch of {batch.shape[0]} rows does not split into {n_micro} equal micro-batches")
    return list(batch.chunk(n_micro))


def pipeline_step(stage: StageModule, schedule: str, idx: torch.Tensor, targets: torch.Tensor,
                  n_micro: int) -> dict[str, Any]:
    """Forward and backward of one batch through the pipeline on this rank (rank = ``stage.index``; every rank
    of the group runs it with its own stage). ``idx`` / ``targets`` (B, T) token ids: the first rank reads
    ``idx``, the last ``targets``. Gradients accumulate into the stage's ``.grad`` (zero them before), the
    tied copies' gradients are summed. Returns ``{"losses": [m micro-batch mean losses] (last rank, else []),
    "grads": {GPT parameter name: the stage's .grad (live, not a copy)}, "events": [Event] of this rank's compute}``."""
    rank, p = stage.index, stage.n_stages
    actions = SCHEDULES[schedule](p, n_micro)[rank]
    first_param = next(stage.parameters())
    dtype, device = first_param.dtype, first_param.device
    inputs = split_micro_batches(idx.to(device), n_micro)
    labels = split_micro_batches(targets.to(device), n_micro)
    hidden = (inputs[0].shape[0], inputs[0].shape[1], stage.n_embd)  # (B_mb, T, C): what crosses stages
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # mb -> (stage input, output or loss)
    sends: list[tuple[Any, torch.Tensor]] = []  # pending isends and the tensors they read
    losses: list[float] = []
    events: list[Event] = []
    for action in actions:
        mb = action.mb
        if action.kind == "F":
            if stage.is_first:
                x = inputs[mb]
            else:
                x = torch.empty(hidden, dtype=dtype, device=device)
                dist.recv(x, src=rank - 1, tag=mb)
                x.requires_grad_(True)
            start = time.perf_counter()
            out = stage(x)
            if stage.is_last:
                out = micro_loss(out, labels[mb], n_micro)
                losses.append(out.item() * n_micro)
            events.append(Event(rank, "F", mb, start, _now(device)))
            saved[mb] = (x, out)
            if not stage.is_last:
                sent = out.detach()
                sends.append((dist.isend(sent, dst=rank + 1, tag=mb), sent))
        else:
            x, out = saved.pop(mb)
            grad = None
            if not stage.is_last:
                grad = torch.empty(hidden, dtype=dtype, device=device)
                dist.recv(grad, src=rank + 1, tag=mb)
            start = time.perf_counter()
            torch.autograd.backward(out, grad)
            events.append(Event(rank, "B", mb, start, _now(device)))
            del out  # the graph of mb is freed here: its activations leave with it
            if not stage.is_first:
                sends.append((dist.isend(x.grad, dst=rank - 1, tag=mb), x.grad))
    for request, _ in sends:
        request.wait()
    reduce_tied_grads(stage)
    grads = {name: p.grad.detach() for name, p in stage.named_parameters() if p.grad is not None}  # live: not copied
    return {"losses": losses, "grads": grads, "events": events}



def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
