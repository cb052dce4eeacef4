"""Embedding-output tying (Press & Wolf, 2017): the LM head's (V, C) matrix *is* the token embedding.

The switch lives on the shared model (``GPTConfig.tie_embeddings``, on by default: GPT-2's layout);
``GPT.__init__`` assigns ``lm_head.weight = wte.weight``, one ``nn.Parameter`` used twice. Autograd
then adds the two uses' gradients into it: the lookup's (rows of the tokens that were read) and the
head's (every row, through the softmax). The functions below state that as something to check:
the tied gradient equals the sum of the two gradients an untied copy of the same weights receives.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from impl.gpt.model import GPT, lm_loss


def untie(model: GPT) -> GPT:
    """Give the head its own copy of the embedding (same values, a second tensor); returns ``model``."""
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    model.config.tie_embeddings = False
    return model


def _loss_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    lm_loss(model(idx), targets).backward()


def tied_gradient(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """Gradient (V, C) of the next-token loss on ``idx``/``targets`` (B, T) w.r.t. the one tied
    embedding/head tensor of the GPT ``config`` (tied) with weights ``state``."""
    model = GPT.from_state({**config, "tie_embeddings": True}, state)
    if model.lm_head.weight is not model.wte.weight:
        raise AssertionError("the tied model holds two tensors")
    _loss_grads(model, idx, targets)
    return model.wte.weight.grad


def untied_gradient_sum(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """The same loss on an untied copy (head = a clone of the embedding): the embedding's gradient plus
    the head's, (V, C). Equal to ``tied_gradient`` when tying lets both uses train the one tensor."""
    model = untie(GPT.from_state({**config, "tie_embeddings": True}, state))
    _loss_grads(model, idx, targets)
    return model.wte.weight.grad + model.lm_head.weight.grad
