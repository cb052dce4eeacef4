"""Mutants of project 21: the capacity ignored, gates not renormalized over the top-k, a load-balancing loss
without its N factor or with f_i taken from the probabilities, an all-to-all whose backward does not send the
gradients back, tokens sent to the ranks unsorted."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import torch
import torch.distributed as dist

from impl.distributed import spawn
from impl.moe import expert_parallel, fast
from impl.moe.router import outputs_and_gradients

# ------------------------------------------------------------------ naive == fast


def capacity_ignored(**case: Any) -> dict[str, torch.Tensor]:
    """Every assignment kept, whatever the capacity: no token is ever dropped."""
    def unlimited(*args, **kw):
        kw["capacity_factor"] = None
        return fast.moe_ffn(*args, **kw)
    return outputs_and_gradients(unlimited, **case)


def gate_not_renormalized(**case: Any) -> dict[str, torch.Tensor]:
    """The raw top-k probabilities used as gates even when renormalizing over the top-k is asked."""
    def raw(*args, **kw):
        kw["renormalize"] = False
        return fast.moe_ffn(*args, **kw)
    return outputs_and_gradients(raw, **case)


# ------------------------------------------------------------------ load balancing


def aux_without_n(probs, experts, alpha=0.01, choices="first"):
    """``alpha * sum f_i P_i``: the factor N (experts) forgotten, so a balanced router no longer scores alpha."""
    e = probs.shape[1]
    from impl.moe.router import load_balancing_loss
    return load_balancing_loss(probs, experts, alpha, choices) / e


def aux_fractions_from_probs(probs, experts, alpha=0.01, choices="first"):
    """``alpha * N * sum P_i^2``: the dispatch fractions replaced by the (differentiable) mean probabilities."""
    p = probs.mean(dim=0)
    return alpha * probs.shape[1] * (p * p).sum()


# ------------------------------------------------------------------ expert parallel


class _BackwardStaysHome(torch.autograd.Function):
    """All-to-all forward; backward returns zeros instead of sending the gradients back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.n = sum(in_splits)
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros((ctx.n, *grad.shape[1:])), None, None, None


def _rank_backward_stays_home(rank, world, setups):
    with patch.object(expert_parallel, "all_to_all", lambda x, o, i, g=None: _BackwardStaysHome.apply(x, o, i, g)):
        return expert_parallel.compare_rank(rank, world, setups)


def _rank_unsorted_dispatch(rank, world, setups):
    with patch.object(expert_parallel, "dispatch_order", lambda experts: torch.arange(len(experts))):
        return expert_parallel.compare_rank(rank, world, setups)


def a2a_backward_not_reversed(setups):
    """Expert parallel whose all-to-all does not send gradients back: inputs and router miss the expert path."""
    return expert_parallel.gather(spawn(_rank_backward_stays_home, 2, setups, timeout_s=120))


def dispatch_unsorted(setups):
    """Expert parallel that sends the kept assignments in routing order, not grouped by destination expert."""
    return expert_parallel.gather(spawn(_rank_unsorted_dispatch, 2, setups, timeout_s=120))
