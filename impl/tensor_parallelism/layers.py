"""Megatron-LM's tensor-parallel layers (Shoeybi et al., 2019, section 3) on ``torch.distributed``.

A linear layer ``Y = X A`` is split across the ``p`` ranks of a group in one of two ways:
- column-parallel: ``A = [A_1 ... A_p]`` by output features; rank r computes ``Y_r = X A_r``, its slice of
  the output, from the whole (replicated) input. Nothing is communicated in the forward; in the backward
  each rank's ``dL/dX`` is only its slice's share, so they are summed (all-reduce): the paper's ``f``.
- row-parallel: ``A = [A_1; ...; A_p]`` by input features; rank r computes ``X_r A_r`` from its slice of
  the input, and the partial products are summed (all-reduce) into the replicated output: the paper's
  ``g``. Its backward needs nothing: the output's gradient is already the same on every rank.
A column-parallel layer followed by a row-parallel one (the MLP, attention split by heads) communicates
once per direction: ``f`` before the pair, ``g`` after it; the sliced activation never leaves its rank.

The token embedding and the (tied) LM head are split by vocabulary: rank r owns rows
``[r V/p, (r+1) V/p)``. The embedding looks up the ids it owns, zeroes the rest and sums (``g``); the head
gives local logits (B, T, V/p) that ``vocab_parallel_cross_entropy`` turns into the full loss with three
all-reduces of one number per token (max, sum of exponentials, target logit) instead of gathering V logits.

Every collective goes through ``all_reduce`` here, which logs its payload when a ``CommLog`` is active:
the communication-volume claim counts what was really sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class CommLog:
    """The collectives one piece of code issued: ``(op, elements, payload bytes)`` per call."""

    calls: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Payload bytes of every logged call (each rank's tensor size; a ring all-reduce moves
        ``2 (p - 1) / p`` of it over each rank's link)."""
        return sum(b for _, _, b in self.calls)


_ACTIVE: list[CommLog] = []


@contextmanager
def comm_log() -> Iterator[CommLog]:
    """Log every collective issued through this module inside the ``with`` block."""
    log = CommLog()
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place ``dist.all_reduce`` of ``t`` (no-op on one rank or without a process group), logged;
    returns ``t``."""
    for log in _ACTIVE:
        log.calls.append((f"all_reduce_{str(op).split('.')[-1].lower()}", t.numel(), t.numel() * t.element_size()))
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _CopyToParallel(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce (sum) of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.contiguous().clone(), group=ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's ``g``: all-reduce (sum) forward, identity backward (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous().clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """``f``: ``x`` unchanged; its gradient is summed over the ranks."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """``g``: the sum of ``x`` over the ranks; the gradient passes through unchanged."""
    return _ReduceFromParallel.apply(x, group)


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone())


class ColumnParallelLinear(nn.Module):
    """This rank's output features of a linear layer: (.., in) -> (.., out_local), weight (out_local, in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.weight, self.bias, self.group = _param(weight), _param(bias), group
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """This rank's input features of a linear layer: (.., in_local) -> (.., out) summed over the ranks.

    The bias is replicated and added once, after the all-reduce (adding it on every rank before the sum
    would count it p times)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group=None):
        super().__init__()
        self.weight, self.bias, self.group = _param(weight), _param(bias), group
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.group)  # (.., out), the full sum
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V_local)`` of a token embedding; ids owned by other ranks look up zeros here
    and the sum over the ranks is the full lookup."""

    def __init__(self, weight: torch.Tensor, start: int, group=None):
        super().__init__()
        self.weight, self.start, self.group = _param(weight), start, group
        self.num_embeddings, self.embedding_dim = self.weight.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        e = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        return reduce_from_parallel(e.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class VocabParallelHead(nn.Module):
    """The LM head's rows ``[start, start + V_local)``: (B, T, C) -> local logits (B, T, V_local)."""

    def __init__(self, weight: nn.Parameter | torch.Tensor, start: int, group=None):
        super().__init__()
        # a tied head shares the embedding's Parameter itself, so one gradient accumulates into it
        self.weight = weight if isinstance(weight, nn.Parameter) else _param(weight)
        self.start, self.group = start, group
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_parallel(x, self.group), self.weight)


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, start: int,
                                 group=None) -> torch.Tensor:
    """Mean cross-entropy of the full-vocabulary softmax, from each rank's logits (B, T, V_local) of the
    vocabulary rows ``[start, start + V_local)`` and the targets (B, T): the same number on every rank.

    log softmax_t = z_t - log sum_v exp(z_v) with z = logits - max: the max, the sum of exponentials and the
    target's logit each need one all-reduce of one number per token."""
    logits = local_logits.reshape(-1, local_logits.shape[-1])  # (N, V_local)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    top = all_reduce(logits.detach().max(dim=-1).values, dist.ReduceOp.MAX, group)  # (N,); a shift: no gradient
    z = logits - top.unsqueeze(-1)
    sum_exp = reduce_from_parallel(z.exp().sum(dim=-1), group)  # (N,)
    local_t = targets.reshape(-1) - start
    mine = (local_t >= 0) & (local_t < logits.shape[-1])
    z_t = z.gather(1, local_t.clamp(0, logits.shape[-1] - 1).unsqueeze(1)).squeeze(1)
    z_t = reduce_from_parallel(torch.where(mine, z_t, torch.zeros_like(z_t)), group)  # (N,)
    return (sum_exp.log() - z_t).mean()
