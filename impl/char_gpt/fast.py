"""The fast forward: fused QKV projection and torch's scaled_dot_product_attention."""

from __future__ import annotations

import torch

from impl.gpt.model import GPT


@torch.no_grad()
def logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Same contract as ``naive.logits``; attention runs through SDPA."""
    return GPT.from_state(config, state, attention="sdpa")(idx)


@torch.no_grad()
def ragged_logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of a padded batch through SDPA; ``attention_mask`` (B, T) is 1 at real
    tokens, 0 at padding (left or right). Only real positions mean anything."""
    return GPT.from_state(config, state, attention="sdpa")(idx, attention_mask=attention_mask)


@torch.no_grad()
def hidden_states(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """n_layer + 1 tensors (B, T, C) in HF's ``output_hidden_states`` convention: the embeddings,
    each block's output, the last one after the final LayerNorm."""
    model = GPT.from_state(config, state, attention="sdpa")
    states = model.hidden_states(idx)
    return states[:-1] + [model.ln_f(states[-1])]
