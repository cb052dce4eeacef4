"""Expert parallelism on ``torch.distributed``: each of ``p`` ranks holds ``E / p`` experts and its own batch.

One MoE forward on a rank:
1. route its own tokens (the router is replicated, as every non-expert weight: data parallel), apply the
   capacity to its own batch (``impl.moe.router``'s rules: capacity per rank's batch, as GShard's groups);
2. sort the kept assignments by expert (so they are grouped by destination rank), exchange the per-expert
   counts with one ``all_to_all_single``;
3. send the token vectors with ``all_to_all_single`` and those split sizes; run the local experts on what
   arrived; send the results back with a second all-to-all (the reverse split sizes); weight by the gates and
   add them up per token.

Autograd flows through both exchanges (``AllToAll``: its backward is the reverse all-to-all), so the experts'
gradients collect every rank's tokens and the inputs' gradients come back to their ranks. The replicated
weights' gradients are summed over ranks (``reduce_replicated``), as data parallelism does. Works on gloo
(CPU) and NCCL (GPU).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from impl.moe.router import Routing, capacity, load_balancing_loss, route, slot_positions


class AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with split sizes; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None) -> torch.Tensor:
    """Differentiable all-to-all: rows ``x`` (sum(in_splits), ...) sent in chunks ``in_splits`` to the ranks;
    returns the (sum(out_splits), ...) rows received, chunk ``r`` from rank ``r``."""
    return AllToAll.apply(x, out_splits, in_splits, group)


def dispatch_order(experts: torch.Tensor) -> torch.Tensor:
    """The order that groups kept assignments by expert (hence by destination rank): a stable sort."""
    return torch.argsort(experts, stable=True)


def moe_ffn_ep(x: torch.Tensor, router_weight: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor,
               w_proj: torch.Tensor, b_proj: torch.Tensor, n_experts: int, top_k: int,
               capacity_factor: float | None, renormalize: bool = True, noise_std: float = 0.0,
               training: bool = False, group: Any = None) -> tuple[torch.Tensor, Routing, torch.Tensor]:
    """(y (N, C), routing, kept (N, k)) of this rank's tokens ``x`` (N, C); ``w_fc`` ... hold this rank's
    ``n_experts / world`` experts (rank r: experts r * E/p ... (r + 1) * E/p - 1). Every rank must call it."""
    world = dist.get_world_size(group)
    local = w_fc.shape[0]
    if local * world != n_experts:
        raise ValueError(f"{n_experts} experts over {world} ranks: each needs {n_experts / world}, has {local}")
    n, c = x.shape
    routing = route(x, router_weight, top_k, renormalize, noise_std, training)
    cap = capacity(n, n_experts, top_k, capacity_factor)
    kept = slot_positions(routing.experts, n_experts) < cap
    tokens = torch.arange(n, device=x.device).unsqueeze(1).expand(n, top_k)[kept]
    experts, gates = routing.experts[kept], routing.gates[kept]
    order = dispatch_order(experts)
    tokens, experts, gates = tokens[order], experts[order], gates[order]
    send_per_expert = torch.bincount(experts, minlength=n_experts)
    recv_per_expert = torch.empty_like(send_per_expert)
    dist.all_to_all_single(recv_per_expert, send_per_expert, group=group)  # rank r's counts for my experts
    send = send_per_expert.view(world, local).sum(1).tolist()
    recv = recv_per_expert.view(world, local).sum(1).tolist()
    arrived = all_to_all(x[tokens], recv, send, group)
    # rows from each source rank come grouped by my local experts, in order
    which = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(world), recv_per_expert)
    out = arrived.new_zeros(arrived.shape)
    for e in range(local):
        rows = (which == e).nonzero().squeeze(1)
        h = F.gelu(arrived[rows] @ w_fc[e] + b_fc[e], approximate="tanh")
        out = out.index_copy(0, rows, (h @ w_proj[e] + b_proj[e]).to(out.dtype))
    back = all_to_all(out, send, recv, group)
    y = back.new_zeros(n, c).index_add(0, tokens, back * gates.unsqueeze(1).to(back.dtype))
    return y, routing, kept


def reduce_replicated(params: list[torch.Tensor], group: Any = None, average: bool = False) -> None:
    """Sum (or average) the gradients of replicated (data-parallel) parameters over the ranks, in place."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            if average:
                p.grad /= dist.get_world_size(group)


def shard(model: nn.Module, rank: int, world: int, group: Any = None) -> list[nn.Parameter]:
    """Keep only rank ``rank``'s experts in every MoE layer of ``model`` (the same initial weights on every
    rank: build the model from one seed) and switch them to expert-parallel forwards. Returns the replicated
    parameters (all but the experts), whose gradients ``reduce_replicated`` must sum after each backward."""
    from impl.moe.layer import MoE

    expert_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, MoE):
            e = m.settings.n_experts
            if e % world:
                raise ValueError(f"{e} experts do not split over {world} ranks")
            part = slice(rank * e // world, (rank + 1) * e // world)
            for name in ("w_fc", "b_fc", "w_proj", "b_proj"):
                setattr(m, name, nn.Parameter(getattr(m, name).detach()[part].clone()))
                expert_ids.add(id(getattr(m, name)))
            m.sharded, m.expert_group = True, group
    return [p for p in model.parameters() if id(p) not in expert_ids]


# ------------------------------------------------------------------ the check: 2 ranks == one process


def _rank_setup(rank: int, world: int, s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One setup on one rank: forward and backward of ``sum(y * upstream) + aux`` on this rank's batch."""
    e = s["w_fc"].shape[0]
    part = slice(rank * e // world, (rank + 1) * e // world)
    x = s["x"][rank].clone().requires_grad_(True)
    router = s["router_weight"].clone().requires_grad_(True)
    experts = {k: s[k][part].clone().requires_grad_(True) for k in ("w_fc", "b_fc", "w_proj", "b_proj")}
    y, routing, _ = moe_ffn_ep(x, router, experts["w_fc"], experts["b_fc"], experts["w_proj"], experts["b_proj"],
                               e, s["top_k"], s["capacity_factor"], s.get("renormalize", True))
    aux = load_balancing_loss(routing.probs, routing.experts, 0.01)
    ((y * s["upstream"][rank]).sum() + aux).backward()
    reduce_replicated([router])
    return {"y": y.detach(), "grad_x": x.grad, "grad_router_weight": router.grad} | \
        {f"grad_{k}": v.grad for k, v in experts.items()}


def compare_rank(rank: int, world: int, setups: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """A spawned rank's part of the check: every setup (several per spawn: a spawn costs seconds)."""
    torch.manual_seed(0)
    return [_rank_setup(rank, world, s) for s in setups]


def gather(per_rank: list[list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """Each setup's outputs and gradients as one process would hold them: outputs and input gradients stacked by
    rank, expert gradients concatenated in expert order, the (already summed) router gradient once."""
    out = []
    for parts in zip(*per_rank, strict=True):
        merged = {"y": torch.stack([p["y"] for p in parts]), "grad_x": torch.stack([p["grad_x"] for p in parts]),
                  "grad_router_weight": parts[0]["grad_router_weight"]}
        for k in ("w_fc", "b_fc", "w_proj", "b_proj"):
            merged[f"grad_{k}"] = torch.cat([p[f"grad_{k}"] for p in parts])
        out.append(merged)
    return out


def expert_parallel(setups: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Run each setup on 2 gloo ranks (``impl.distributed.spawn``), experts split between them, batch ``r`` of
    ``x`` (2, N, C) on rank ``r``; outputs and gradients gathered (``gather``)."""
    from impl.distributed import spawn

    return gather(spawn(compare_rank, 2, setups, timeout_s=120))


def single_process(setups: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """The same as ``expert_parallel`` in one process with every expert: each rank's batch through
    ``fast.moe_ffn``, gradients of the shared weights summed over the batches (data parallelism's sum)."""
    from impl.moe import fast

    out = []
    for s in setups:
        names = ("router_weight", "w_fc", "b_fc", "w_proj", "b_proj")
        w = {k: s[k].clone().requires_grad_(True) for k in names}
        ys, gxs = [], []
        for r in range(s["x"].shape[0]):
            x = s["x"][r].clone().requires_grad_(True)
            y, routing, _ = fast.moe_ffn(x, *(w[k] for k in names), s["top_k"], s["capacity_factor"],
                                         s.get("renormalize", True))
            aux = load_balancing_loss(routing.probs, routing.experts, 0.01)
            ((y * s["upstream"][r]).sum() + aux).backward()
            ys.append(y.detach())
            gxs.append(x.grad)
        out.append({"y": torch.stack(ys), "grad_x": torch.stack(gxs)} | {f"grad_{k}": w[k].grad for k in names})
    return out
