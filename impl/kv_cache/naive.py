"""Generation without a cache: every new token re-runs the model over the whole context.

Cost per step grows with the context, so n new tokens cost O(n^2) token-forwards.
"""

from __future__ import annotations

import torch

from impl.gpt.model import GPT
from impl.gpt.sampling import sample_next


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    crop_context: bool = False,
) -> torch.Tensor:
    """Prompt ids (B, T) followed by ``max_new_tokens`` generated ids: (B, T + max_new_tokens).

    Without ``crop_context`` the whole sequence must fit the model's ``block_size``. With it,
    each step conditions on the last ``block_size`` tokens only (nanoGPT's sampler: long samples
    from a short-context model; a KV cache cannot do this, as positions would shift).
    """
    block = model.config.block_size
    total = idx.shape[1] + max_new_tokens
    if total > block and not crop_context:
        raise ValueError(f"prompt + new tokens = {total} exceeds block_size {block}")
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block:])  # (B, T, vocab): the whole context, again
        next_id = sample_next(logits[:, -1, :], temperature, top_k, generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (B, T) by the GPT ``config`` with weights ``state``."""
    return generate(GPT.from_state(config, state), prompt, max_new_tokens)


def ragged_greedy(config: dict, state: dict[str, torch.Tensor], prompts: list[torch.Tensor],
                  max_new_tokens: int) -> torch.Tensor:
    """Greedy new tokens (B, max_new_tokens) of prompts of different lengths, each generated alone."""
    model = GPT.from_state(config, state)
    return torch.cat([generate(model, p.reshape(1, -1), max_new_tokens)[:, -max_new_tokens:] for p in prompts])
