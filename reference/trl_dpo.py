"""TRL's own DPO loss arithmetic on given log-probs: the oracle ``impl.dpo`` is checked against.

TRL 1.16 (pinned: ``TRL_VERSION``) has no free function for the DPO loss: the arithmetic lives inside
``DPOTrainer._compute_loss(self, model, inputs, return_outputs)``, which runs the model, sums its
per-token log-probs over the completion, reads precomputed reference log-probs from ``inputs`` and then
computes the loss (``sigmoid``, ``ipo``, ...), the rewards and its logged metrics. We call that method
unbound, with the least scaffolding that lets its real code run:

- ``self`` is a ``SimpleNamespace`` with the attributes the method reads (``beta``, ``loss_types``,
  ``loss_weights``, ``f_divergence_type="reverse_kl"`` (standard DPO), ``precompute_ref_logps=True``,
  ``ld_alpha=None``, ``use_weighting=False``, ``aux_loss_enabled=False``, a metrics dict) and an
  ``accelerator`` whose ``gather`` records what it is given: the method gathers the per-pair chosen and
  rejected rewards first, so the recorder hands them back;
- ``model`` is a stand-in whose output carries, as the "per-token log-probs" of a completion, the given
  summed log-prob in its first column and zeros after it, ``completion_tokens`` columns in all: TRL's
  own sum over the completion gives back the given value, and its ``completion_mask`` gives IPO the
  completion lengths it averages over. Entropy, mean logits and top-1 flags are zeros (metrics only).

Reference log-probs reach TRL as data computed under ``no_grad`` (TRL's precompute path), so their
gradients are zero by construction, as in TRL's training. TRL 1.16's ``sigmoid`` has no label smoothing.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer

TRL_VERSION = "1.16.0"
if trl.__version__ != TRL_VERSION:
    raise ImportError(f"reference.trl_dpo wraps TRL {TRL_VERSION}'s DPOTrainer._compute_loss; found trl "
                      f"{trl.__version__}: re-read its dpo_trainer.py and update this adapter")


class _RecordingAccelerator:
    """What ``_compute_loss`` asks of accelerate on one process: identity gathers, each one recorded."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.gathered: list[torch.Tensor] = []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.gathered.append(tensor)
        return tensor

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def trl_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                 chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, chosen_rewards, rejected_rewards)`` computed by TRL's ``DPOTrainer._compute_loss`` from the
    summed completion log-probs (B,); the loss keeps its graph to ``policy_chosen`` / ``policy_rejected``.
    ``chosen_tokens`` / ``rejected_tokens`` (B,) are the completion lengths (None: 1, IPO then uses sums)."""
    B = policy_chosen.shape[0]
    ones = torch.ones(B, dtype=torch.long)
    lengths = torch.cat([ones if chosen_tokens is None else chosen_tokens.long(),
                         ones if rejected_tokens is None else rejected_tokens.long()])  # (2B,)
    width = int(lengths.max())
    logps = torch.cat([policy_chosen, policy_rejected])  # (2B,): TRL's batch is [chosen, rejected]
    per_token = torch.cat([logps[:, None], logps.new_zeros(2 * B, width - 1)], dim=1)  # (2B, width)
    # one prompt token, then each row's completion: the shifted mask is ``width`` wide like per_token
    completion_mask = torch.zeros(2 * B, width + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1:1 + n] = 1
    zeros = torch.zeros(2 * B, width, dtype=logps.dtype)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = _RecordingAccelerator()
    shim = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, args=SimpleNamespace(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * B, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, width + 1, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(shim, lambda **kwargs: outputs, inputs, return_outputs=False)
    chosen_rewards, rejected_rewards = accelerator.gathered[:2]  # rewards/chosen, rewards/rejected
    return loss, chosen_rewards, rejected_rewards


def dpo_loss_with_grads(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                        ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                        label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
                        rejected_tokens: torch.Tensor | None = None) -> dict[str, Any]:
    """TRL's loss and rewards plus the loss's gradient on each log-prob input, by autograd; the reference
    inputs arrive detached (TRL computes them under no_grad), so their gradients are zeros."""
    if label_smoothing != 0:
        raise ValueError("TRL 1.16's sigmoid DPO loss has no label smoothing; compare at label_smoothing=0")
    policy_chosen = policy_chosen.detach().clone().requires_grad_(True)
    policy_rejected = policy_rejected.detach().clone().requires_grad_(True)
    loss, chosen_rewards, rejected_rewards = trl_dpo_loss(policy_chosen, policy_rejected, ref_chosen.detach(),
                                                          ref_rejected.detach(), beta, loss_type, chosen_tokens,
                                                          rejected_tokens)
    loss.backward()
    return {"loss": loss.detach(), "chosen_rewards": chosen_rewards.detach(),
            "rejected_rewards": rejected_rewards.detach(), "grad_policy_chosen": policy_chosen.grad,
            "grad_policy_rejected": policy_rejected.grad, "grad_ref_chosen": torch.zeros_like(ref_chosen),
            "grad_ref_rejected": torch.zeros_like(ref_rejected)}
