"""DPO, one example at a time: the loss as the paper writes it, no batching, no padding.

For each pair the model runs on prompt + chosen and on prompt + rejected separately; each completion's
log-prob is the sum of ``log p(token | everything before it)`` over its tokens; the per-pair loss is
plain arithmetic on those four numbers (see ``impl.dpo.fast`` for the formulas); the loss is the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from impl.dpo.fast import loss_with_grads
from impl.gpt.model import GPT


def sequence_logp(model: GPT, prompt: Sequence[int], completion: Sequence[int]) -> torch.Tensor:
    """log p(completion | prompt) (a 0-d tensor): the model run on the unpadded sequence alone."""
    ids = torch.tensor([[*prompt, *completion]])
    logits = model(ids)[0]  # (T, V)
    total = logits.new_zeros(())
    for t in range(len(prompt), ids.shape[1]):
        total = total + torch.log_softmax(logits[t - 1], dim=-1)[ids[0, t]]  # logit t - 1 predicts token t
    return total


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), written so that neither branch overflows: -log sigmoid(z) is softplus(-z)."""
    return torch.log1p(torch.exp(x)) if x.item() <= 0 else x + torch.log1p(torch.exp(-x))


def pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              chosen_tokens: int = 1, rejected_tokens: int = 1) -> torch.Tensor:
    """One pair's DPO (sigmoid) or IPO loss from its four log-probs (0-d tensors)."""
    chosen_logratio = policy_chosen - ref_chosen.detach()
    rejected_logratio = policy_rejected - ref_rejected.detach()
    if loss_type == "sigmoid":
        z = beta * (chosen_logratio - rejected_logratio)
        return (1 - label_smoothing) * _softplus(-z) + label_smoothing * _softplus(z)
    if loss_type == "ipo":
        delta = chosen_logratio / max(chosen_tokens, 1) - rejected_logratio / max(rejected_tokens, 1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, chosen_rewards, rejected_rewards)`` like ``impl.dpo.fast.dpo_loss``, pair by pair."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    n = len(policy_chosen)
    losses = []
    for i in range(n):
        counts = (1, 1) if chosen_tokens is None else (int(chosen_tokens[i]), int(rejected_tokens[i]))
        losses.append(pair_loss(policy_chosen[i], policy_rejected[i], ref_chosen[i], ref_rejected[i], beta,
                                loss_type, label_smoothing, *counts))
    loss = sum(losses) / n
    chosen_rewards = torch.stack([beta * (policy_chosen[i] - ref_chosen[i]).detach() for i in range(n)])
    rejected_rewards = torch.stack([beta * (policy_rejected[i] - ref_rejected[i]).detach() for i in range(n)])
    return loss, chosen_rewards, rejected_rewards


def dpo_loss_with_grads(**kwargs: Any) -> dict[str, torch.Tensor]:
    """This module's loss, rewards and input gradients (``impl.dpo.fast.loss_with_grads``)."""
    return loss_with_grads(dpo_loss, **kwargs)


def dpo_batch_loss(config: dict[str, Any], state: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor],
                   prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                   rejected: Sequence[Sequence[int]], beta: float, loss_type: str = "sigmoid",
                   ) -> dict[str, torch.Tensor]:
    """``impl.dpo.fast.dpo_batch_loss`` example by example: 4 unpadded forwards per pair."""
    policy = GPT.from_state(config, state)
    reference = GPT.from_state(config, ref_state)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = [], [], [], []
    for prompt, good, bad in zip(prompts, chosen, rejected, strict=True):
        policy_chosen.append(sequence_logp(policy, prompt, good))
        policy_rejected.append(sequence_logp(policy, prompt, bad))
        with torch.no_grad():
            ref_chosen.append(sequence_logp(reference, prompt, good))
            ref_rejected.append(sequence_logp(reference, prompt, bad))
    tokens = torch.tensor([len(c) for c in chosen]), torch.tensor([len(r) for r in rejected])
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        torch.stack(policy_chosen), torch.stack(policy_rejected), torch.stack(ref_chosen), torch.stack(ref_rejected),
        beta, loss_type, 0.0, *tokens)
    loss.backward()
    return {"loss": loss.detach(), "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "policy_chosen": torch.stack(policy_chosen).detach(),
            "policy_rejected": torch.stack(policy_rejected).detach(), "grad_embedding": policy.wte.weight.grad}
