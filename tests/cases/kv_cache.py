"""Cases for project 8: prompts and generation lengths for greedy decoding."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from tests.cases.gpt import random_gpt


def prompt_case(seed: int, batch: int, prompt_len: int, max_new_tokens: int, n_layer: int = 2,
                n_head: int = 4, head_dim: int = 8, vocab_size: int = 65, id: str | None = None) -> dict[str, Any]:
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size,
                               block_size=prompt_len + max_new_tokens, peaked=True)
    prompt = torch.randint(vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    case = {"config": config, "state": state, "prompt": prompt, "max_new_tokens": max_new_tokens}
    return case | ({"id": id} if id else {})


prompts = Cases(
    edge=[
        prompt_case(0, 1, 1, 1, id="one-token-prompt-one-new"),
        prompt_case(1, 1, 1, 40, id="one-token-prompt"),
        prompt_case(2, 1, 30, 1, id="one-new-token"),
        prompt_case(3, 2, 7, 25, id="batch-of-two"),
        prompt_case(4, 1, 16, 100, n_layer=4, n_head=4, head_dim=32, id="p1-shape"),
    ],
    strategy=st.builds(
        prompt_case,
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 2),
        prompt_len=st.integers(1, 24),
        max_new_tokens=st.integers(1, 40),
        n_layer=st.integers(1, 3),
        n_head=st.sampled_from([1, 2, 4]),
        head_dim=st.sampled_from([4, 8]),
    ),
)
