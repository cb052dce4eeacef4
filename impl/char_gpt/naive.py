"""The textbook forward: attention one head at a time with an explicit causal mask matrix."""

from __future__ import annotations

import torch

from impl.gpt.model import GPT


@torch.no_grad()
def logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT ``config`` with weights ``state`` on ids ``idx`` (B, T)."""
    return GPT.from_state(config, state, attention="naive")(idx)
