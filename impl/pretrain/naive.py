"""One training step's gradients with full activations: the forward keeps every intermediate
of every block for the backward to read. Memory grows with layers x batch x sequence."""

from __future__ import annotations

import torch

from impl.gpt.model import GPT, lm_loss


def loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward + backward of one batch in train mode; returns ``loss`` and one gradient per
    parameter name (zeros where no gradient reached it, so a cut graph shows up as a difference).

    idx, targets: (B, T) token ids.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(idx), targets)
    loss.backward()
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p)
             for name, p in model.named_parameters()}
    return {"loss": loss.detach(), **grads}


def gradients(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and gradients of the GPT ``config`` with weights ``state`` (in their dtype), storing
    all activations."""
    return loss_and_grads(GPT.from_state(config, state, gradient_checkpointing=False), idx, targets)
