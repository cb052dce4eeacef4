"""Mutants of project 6's DPO: each breaks one thing a check must notice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from impl.dpo import fast


def _loss_with_grads(loss_fn: Callable[..., Any], **case: Any) -> dict[str, torch.Tensor]:
    return fast.loss_with_grads(loss_fn, **case)


def swapped_chosen_rejected(**case: Any) -> dict[str, torch.Tensor]:
    """The pair read backwards: the policy is pushed towards the rejected answer."""
    def loss(pc, pr, rc, rr, **kw):
        return fast.dpo_loss(pr, pc, rr, rc, **kw)
    return _loss_with_grads(loss, **case)


def beta_ignored(**case: Any) -> dict[str, torch.Tensor]:
    """beta fixed at 1 whatever the caller asks for."""
    def loss(pc, pr, rc, rr, beta, **kw):
        return fast.dpo_loss(pc, pr, rc, rr, 1.0, **kw)
    return _loss_with_grads(loss, **case)


def reference_not_detached(**case: Any) -> dict[str, torch.Tensor]:
    """The reference log-probs keep their graph: gradient flows into the reference."""
    def loss(pc, pr, rc, rr, beta, loss_type="sigmoid", label_smoothing=0.0, chosen_tokens=None,
             rejected_tokens=None):
        h_w, h_l = pc - rc, pr - rr  # no detach
        if loss_type == "ipo":
            if chosen_tokens is not None:
                h_w, h_l = h_w / chosen_tokens.clamp(min=1), h_l / rejected_tokens.clamp(min=1)
            losses = (h_w - h_l - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (h_w - h_l))
        return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()
    return _loss_with_grads(loss, **case)


def _with_sequence_logps(replacement: Callable[..., torch.Tensor], **case: Any) -> dict[str, torch.Tensor]:
    original = fast.sequence_logps
    fast.sequence_logps = replacement
    try:
        return fast.dpo_batch_loss(**case)
    finally:
        fast.sequence_logps = original


def _masked_logps(model, batch, mask: torch.Tensor) -> torch.Tensor:
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    token_logps = -F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    return (token_logps * mask[:, 1:]).sum(dim=1)


def padding_counted(**case: Any) -> dict[str, torch.Tensor]:
    """The batched forward scores the padding after each short completion as if it were answer."""
    def logps(model, batch):
        return _masked_logps(model, batch, batch.completion_mask | (1 - batch.attention_mask))
    return _with_sequence_logps(logps, **case)


def prompt_counted(**case: Any) -> dict[str, torch.Tensor]:
    """The batched forward scores the prompt tokens too (every real token, not just the completion)."""
    def logps(model, batch):
        return _masked_logps(model, batch, batch.attention_mask)
    return _with_sequence_logps(logps, **case)


def reference_ignored(**case: Any) -> dict[str, torch.Tensor]:
    """The reference log-probs taken as 0: the loss is a function of the policy alone."""
    original = fast.ReferenceCache.logps

    def zeros(self, pairs, dtype=torch.float32, device="cpu"):
        chosen, rejected = original(self, pairs, dtype, device)
        return torch.zeros_like(chosen), torch.zeros_like(rejected)
    fast.ReferenceCache.logps = zeros
    try:
        return fast.dpo_batch_loss(**case)
    finally:
        fast.ReferenceCache.logps = original
