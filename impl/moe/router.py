"""The router of a Mixture-of-Experts layer: top-k gating, expert capacity, the Switch load-balancing loss.

Conventions every MoE path here shares (naive, fast, expert-parallel):

- routing: ``probs = softmax(x @ W_r^T)`` over the ``E`` experts (W_r: (E, C), no bias); each token goes to its
  ``top_k`` most probable experts. Its gate for each chosen expert is that probability, renormalized over the
  chosen ``top_k`` (Mixtral) when ``renormalize`` is true, else the raw probability (Switch, top-1: with one
  expert a renormalized gate would be 1 and the router would get no gradient from the language-model loss);
- optional noise: during training only, ``noise_std * N(0, 1)`` is added to the router logits before the
  softmax (a simplified noisy top-k gating: a fixed scale, not Shazeer et al.'s learned one);
- capacity: each expert takes at most ``ceil(capacity_factor * tokens * top_k / E)`` assignments of a batch.
  Queue order: every token's first choice in token order, then every token's second choice, ... (first
  choices are never dropped for a second choice). An assignment past its expert's capacity is dropped: its
  contribution is 0 and the residual stream carries the token. ``capacity_factor=None``: no limit;
- load balancing (Switch Transformers, eq. 4): ``alpha * E * sum_i f_i * P_i`` with ``P_i`` the mean router
  probability of expert ``i`` over the batch and ``f_i`` the fraction of tokens whose FIRST choice is ``i``
  (Switch's top-1 count; ``choices="all"`` counts all ``top_k`` choices: ``f_i`` = share of the ``N * top_k``
  assignments). Counted before capacity, as in Switch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Where the tokens of a batch go: ``probs`` (N, E) router probabilities, ``experts`` (N, k) the chosen
    experts (most probable first), ``gates`` (N, k) their weights."""

    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool = True,
          noise_std: float = 0.0, training: bool = False) -> Routing:
    """Top-k gating of tokens ``x`` (N, C) by ``router_weight`` (E, C); probabilities in at least fp32."""
    logits = x @ router_weight.t()
    if noise_std > 0 and training:
        logits = logits + noise_std * torch.randn_like(logits)
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    top, experts = probs.topk(top_k, dim=-1)
    gates = top / top.sum(dim=-1, keepdim=True) if renormalize else top
    return Routing(probs, experts, gates)


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Assignments one expert takes from a batch: ``ceil(capacity_factor * n_tokens * top_k / n_experts)``
    (all ``n_tokens`` when ``capacity_factor`` is None: nothing is dropped)."""
    if capacity_factor is None:
        return n_tokens
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for no limit), got {capacity_factor}")
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def slot_positions(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each assignment's place (N, k) in its expert's queue: first choices in token order, then second choices.

    An assignment is kept when its place is below the expert's capacity."""
    n, k = experts.shape
    flat = experts.t().reshape(-1)  # choice-major: (k * N,)
    one_hot = F.one_hot(flat, n_experts)
    place = (one_hot.cumsum(dim=0) - 1).gather(1, flat.unsqueeze(1)).squeeze(1)
    return place.view(k, n).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, alpha: float = 0.01,
                        choices: str = "first") -> torch.Tensor:
    """Switch's auxiliary loss ``alpha * E * sum_i f_i * P_i`` (a scalar; 1 * alpha when perfectly uniform).

    ``probs`` (N, E) router probabilities, ``experts`` (N, k) chosen experts, most probable first;
    ``choices``: "first" (f_i from first choices, as Switch) or "all" (from all k choices)."""
    n, n_experts = probs.shape
    chosen = experts[:, :1] if choices == "first" else experts
    if choices not in ("first", "all"):
        raise ValueError(f"choices must be 'first' or 'all', got {choices!r}")
    f = torch.bincount(chosen.reshape(-1), minlength=n_experts).to(probs.dtype) / chosen.numel()
    p = probs.mean(dim=0)
    return alpha * n_experts * (f * p).sum()


def outputs_and_gradients(ffn: Callable[..., Any], x: torch.Tensor, router_weight: torch.Tensor,
                          w_fc: torch.Tensor, b_fc: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor,
                          upstream: torch.Tensor, **settings: Any) -> dict[str, torch.Tensor]:
    """Run the MoE feed-forward ``ffn`` (naive or fast) on copies of the tensors and backpropagate
    ``sum(y * upstream)`` plus the load-balancing loss: the output, the loss and every gradient, for checks."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in
              dict(x=x, router_weight=router_weight, w_fc=w_fc, b_fc=b_fc, w_proj=w_proj, b_proj=b_proj).items()}
    y, routing, _ = ffn(**leaves, **settings)
    aux = load_balancing_loss(routing.probs, routing.experts, 0.01)
    ((y * upstream).sum() + aux).backward()
    return {"y": y.detach(), "aux": aux.detach()} | {f"grad_{k}": v.grad for k, v in leaves.items()}
