"""The MoE feed-forward written as the definition: a Python loop over tokens, choices and experts.

One token at a time: its router probabilities, a Python sort for its top-k experts, its gates; then the
capacity queues filled in the documented order (first choices of every token, then second choices), each kept
assignment running its expert (GPT-2's MLP shape: Linear, GELU tanh, Linear) on that one token. Slow and
obviously right: the oracle of ``fast.moe_ffn``. Conventions: ``impl.moe.router``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from impl.moe.router import Routing


def expert(e: int, v: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor,
           b_proj: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one token ``v`` (C,): ``gelu_tanh(v @ w_fc[e] + b_fc[e]) @ w_proj[e] + b_proj[e]``."""
    return F.gelu(v @ w_fc[e] + b_fc[e], approximate="tanh") @ w_proj[e] + b_proj[e]


def moe_ffn(x: torch.Tensor, router_weight: torch.Tensor, w_fc: torch.Tensor, b_fc: torch.Tensor,
            w_proj: torch.Tensor, b_proj: torch.Tensor, top_k: int, capacity_factor: float | None,
            renormalize: bool = True) -> tuple[torch.Tensor, Routing, torch.Tensor]:
    """(y (N, C), routing, kept (N, k) bool) of tokens ``x`` (N, C) through ``E = w_fc.shape[0]`` experts.

    Expert weights are stacked: ``w_fc`` (E, C, H), ``b_fc`` (E, H), ``w_proj`` (E, H, C), ``b_proj`` (E, C)."""
    n, c = x.shape
    n_experts = w_fc.shape[0]
    cap = n if capacity_factor is None else math.ceil(capacity_factor * n * top_k / n_experts)
    all_probs, choices, gates = [], [], []
    for t in range(n):
        logits = torch.stack([x[t] @ router_weight[e] for e in range(n_experts)])
        p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0)
        order = sorted(range(n_experts), key=lambda e: -p[e].item())[:top_k]
        g = [p[e] for e in order]
        if renormalize:
            total = sum(g)
            g = [gi / total for gi in g]
        all_probs.append(p)
        choices.append(order)
        gates.append(g)
    filled = [0] * n_experts
    kept = [[False] * top_k for _ in range(n)]
    parts: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for j in range(top_k):  # every first choice before any second choice
        for t in range(n):
            e = choices[t][j]
            if filled[e] < cap:
                filled[e] += 1
                kept[t][j] = True
                parts[t].append(gates[t][j] * expert(e, x[t], w_fc, b_fc, w_proj, b_proj))
    y = torch.stack([sum(p[1:], p[0]) if p else x.new_zeros(c) for p in parts]) if n else x.new_zeros(0, c)
    routing = Routing(torch.stack(all_probs) if n else x.new_zeros(0, n_experts),
                      torch.tensor(choices, dtype=torch.long).view(n, top_k),
                      torch.stack([torch.stack(g) for g in gates]) if n else x.new_zeros(0, top_k))
    return y, routing, torch.tensor(kept, dtype=torch.bool).view(n, top_k)


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, alpha: float = 0.01,
                        choices: str = "first") -> torch.Tensor:
    """Switch's ``alpha * E * sum_i f_i * P_i`` counted entry by entry (see ``router.load_balancing_loss``)."""
    n, n_experts = probs.shape
    k = 1 if choices == "first" else experts.shape[1]
    counts = [0] * n_experts
    for t in range(n):
        for j in range(k):
            counts[int(experts[t, j])] += 1
    total = probs.new_zeros(())
    for i in range(n_experts):
        p_i = sum(probs[t, i] for t in range(n)) / n
        total = total + counts[i] / (n * k) * p_i
    return alpha * n_experts * total


def forward_backward(**case) -> dict[str, torch.Tensor]:
    """``moe_ffn``'s output, load-balancing loss and gradients on a check case (``router.outputs_and_gradients``)."""
    from impl.moe.router import outputs_and_gradients

    return outputs_and_gradients(moe_ffn, **case)
