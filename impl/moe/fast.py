"""The MoE feed-forward as batched tensor work: grouped dispatch into per-expert capacity buffers, two batched
matmuls for all experts at once, one scatter-add back.

Each kept assignment gets the slot ``expert * capacity + place`` of an (E * capacity, C) buffer, so the buffer
is the tokens sorted (grouped) by expert, each group padded to the capacity; ``baddbmm`` runs every expert on
its group. The compute is ``E * capacity ~= capacity_factor * N * top_k`` token-expert products whatever ``E``
is: more experts, more parameters, about the same FLOPs per token. Conventions: ``impl.moe.router``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from impl.moe.router import Routing, capacity, outputs_and_gradients, route, slot_positions


def dispatch(routing: Routing, n_experts: int, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept (N, k) bool, token index, buffer slot) of every kept assignment (token-major order)."""
    n, k = routing.experts.shape
    place = slot_positions(routing.experts, n_experts)
    kept = place < cap
    tokens = torch.arange(n, device=place.device).unsqueeze(1).expand(n, k)[kept]
    slots = routing.experts[kept] * cap + place[kept]
    return kept, tokens, slots


def run_experts(buffer: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor,
                b_proj: torch.Tensor) -> torch.Tensor:
    """Every expert on its rows of ``buffer`` (E, rows, C) at once: (E, rows, C)."""
    h = F.gelu(torch.baddbmm(b_fc.unsqueeze(1), buffer, w_fc), approximate="tanh")
    return torch.baddbmm(b_proj.unsqueeze(1), h, w_proj)


def moe_ffn(x: torch.Tensor, router_weight: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor,
            w_proj: torch.Tensor, b_proj: torch.Tensor, top_k: int, capacity_factor: float | None,
            renormalize: bool = True, noise_std: float = 0.0,
            training: bool = False) -> tuple[torch.Tensor, Routing, torch.Tensor]:
    """(y (N, C), routing, kept (N, k) bool): ``naive.moe_ffn``'s result, computed with batched matmuls."""
    n, c = x.shape
    n_experts = w_fc.shape[0]
    routing = route(x, router_weight, top_k, renormalize, noise_std, training)
    cap = capacity(n, n_experts, top_k, capacity_factor)
    kept, tokens, slots = dispatch(routing, n_experts, cap)
    buffer = x.new_zeros(n_experts * cap, c).index_copy(0, slots, x[tokens])
    out = run_experts(buffer.view(n_experts, cap, c), w_fc.to(x.dtype), b_fc.to(x.dtype), w_proj.to(x.dtype),
                      b_proj.to(x.dtype)).view(n_experts * cap, c)
    weighted = out[slots] * routing.gates[kept].unsqueeze(1).to(out.dtype)
    y = out.new_zeros(n, c).index_add(0, tokens, weighted)
    return y, routing, kept


def forward_backward(**case: Any) -> dict[str, torch.Tensor]:
    """``moe_ffn``'s output, load-balancing loss and gradients on a check case (``router.outputs_and_gradients``)."""
    return outputs_and_gradients(moe_ffn, **case)
