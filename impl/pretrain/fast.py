"""The same gradients with gradient checkpointing per block (Chen et al., 2016): the forward
keeps only each block's input; the backward re-runs one block at a time to rebuild what it
needs. Activation memory drops from O(layers x activations per block) to O(layers x one
(B, T, C) tensor + one block's activations), for about one extra forward of compute."""

from __future__ import annotations

import torch

from impl.gpt.model import GPT
from impl.pretrain.naive import loss_and_grads


def gradients(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
              targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same contract as ``naive.gradients``; the shared GPT checkpoints each block
    (``GPTConfig.gradient_checkpointing``, ``torch.utils.checkpoint`` without re-entrancy)."""
    return loss_and_grads(GPT.from_state(config, state, gradient_checkpointing=True), idx, targets)
