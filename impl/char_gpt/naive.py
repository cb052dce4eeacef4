"""The textbook forward: attention one head at a time with an explicit causal mask matrix."""

from __future__ import annotations

import torch

from impl.gpt.model import GPT


@torch.no_grad()
def logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT ``config`` with weights ``state`` on ids ``idx`` (B, T)."""
    return GPT.from_state(config, state, attention="naive")(idx)


@torch.no_grad()
def ragged_logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a padded batch, attention one head at a time with an explicit mask
    (causal and padding); ``attention_mask`` (B, T) is 1 at real tokens, 0 at padding."""
    return GPT.from_state(config, state, attention="naive")(idx, attention_mask=attention_mask)


@torch.no_grad()
def hidden_states(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """n_layer + 1 tensors (B, T, C) in HF's ``output_hidden_states`` convention (the last one after
    the final LayerNorm), attention one head at a time."""
    model = GPT.from_state(config, state, attention="naive")
    states = model.hidden_states(idx)
    return states[:-1] + [model.ln_f(states[-1])]
