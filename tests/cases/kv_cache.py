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


def ragged_case(seed: int, lengths: list[int], max_new_tokens: int, n_layer: int = 2, n_head: int = 4,
                head_dim: int = 8, vocab_size: int = 65, id: str | None = None) -> dict[str, Any]:
    """Prompts of ``lengths`` tokens (one batch, padded by the implementation) and a peaked GPT."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size,
                               block_size=max(lengths) + max_new_tokens, peaked=True)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(vocab_size, (n,), generator=gen) for n in lengths]
    case = {"config": config, "state": state, "prompts": prompts, "max_new_tokens": max_new_tokens}
    return case | ({"id": id} if id else {})


ragged_prompts = Cases(
    edge=[
        ragged_case(0, [5], 10, id="one-prompt"),
        ragged_case(1, [6, 6], 12, id="equal-lengths"),
        ragged_case(2, [1, 17], 20, id="one-token-beside-long"),
        ragged_case(3, [9, 1, 4, 13], 25, id="four-rows"),
        ragged_case(4, [16, 3], 60, n_layer=4, n_head=4, head_dim=32, id="p1-shape"),
    ],
    strategy=st.builds(
        ragged_case,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 16), min_size=1, max_size=4),
        max_new_tokens=st.integers(1, 30),
        n_layer=st.integers(1, 3),
        n_head=st.sampled_from([1, 2, 4]),
        head_dim=st.sampled_from([4, 8]),
    ),
)


def probs_case(seed: int, batch: int, vocab_size: int, temperature: float, top_k: int | None,
               top_p: float | None, scale: float = 3.0, id: str | None = None) -> dict[str, Any]:
    """Random next-token logits (B, vocab) and a sampling setting."""
    logits = torch.randn(batch, vocab_size, generator=torch.Generator().manual_seed(seed)) * scale
    case = {"logits": logits, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return case | ({"id": id} if id else {})


sampling_settings = Cases(
    edge=[
        probs_case(0, 2, 50, 1.0, None, None, id="plain-softmax"),
        probs_case(1, 3, 50, 0.7, 20, 0.8, id="temperature-top-k-top-p"),
        probs_case(2, 2, 100, 1.3, None, 0.5, id="top-p-only"),
        probs_case(3, 2, 30, 1.0, 5, None, id="top-k-only"),
        probs_case(4, 4, 64, 1.0, None, 0.95, scale=8.0, id="peaked-top-p"),
        probs_case(5, 1, 2, 0.5, 1, 0.1, id="two-tokens"),
    ],
    strategy=st.builds(
        probs_case,
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 4),
        vocab_size=st.integers(2, 120),
        temperature=st.floats(0.3, 2.0),
        top_k=st.one_of(st.none(), st.integers(1, 60)),
        top_p=st.one_of(st.none(), st.floats(0.05, 0.99)),
        scale=st.floats(0.5, 8.0),
    ),
)
