"""Random GPT weights for checks: a config dict, a state dict and token ids, all from a seed."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from impl.gpt.model import GPT, GPTConfig


def random_gpt(
    seed: int, n_layer: int, n_head: int, head_dim: int, vocab_size: int, block_size: int,
    bias: bool = True, peaked: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state) of a freshly initialised GPT. ``peaked`` scales the final layer norm so
    logits are far apart (greedy decoding then has no near-ties that float rounding could flip)
    and sharpens attention so the next token depends on the context, not just the last token."""
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_head * head_dim, bias=bias).to_dict()
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**config))
    if peaked:
        with torch.no_grad():
            model.ln_f.weight.mul_(50.0)
            for block in model.blocks:
                block.attn.c_attn.weight.mul_(10.0)
                block.attn.c_proj.weight.mul_(10.0)
    return config, {k: v.clone() for k, v in model.state_dict().items()}


def logit_case(seed: int, batch: int, length: int, n_layer: int, n_head: int, head_dim: int,
               vocab_size: int = 65, bias: bool = True, dtype: torch.dtype = torch.float32,
               id: str | None = None) -> dict[str, Any]:
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    idx = torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    case = {"config": config, "state": state, "idx": idx, "dtype": dtype}
    return case | ({"id": id} if id else {})


def logit_strategy() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        logit_case,
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 3),
        length=st.integers(1, 40),
        n_layer=st.integers(1, 3),
        n_head=st.integers(1, 6),
        head_dim=st.sampled_from([2, 4, 8, 16]),
        vocab_size=st.integers(2, 80),
        bias=st.booleans(),
    )


def padding_mask(lengths: list[int], length: int, side: str) -> torch.Tensor:
    """attention_mask (B, length), 1 at each row's ``lengths[b]`` real tokens, 0 at its padding, the
    padding on the ``side`` ("left" or "right") of the row."""
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, length - n:] = 1
        else:
            mask[row, :n] = 1
    return mask


def ragged_case(seed: int, lengths: list[int], side: str, n_layer: int, n_head: int, head_dim: int,
                vocab_size: int = 65, bias: bool = True, extra_padding: int = 0,
                dtype: torch.dtype = torch.float32, id: str | None = None) -> dict[str, Any]:
    """A padded batch for a random GPT: rows of ``lengths`` real tokens padded on ``side`` to the
    longest plus ``extra_padding``. Padding slots hold random ids too, so reading them shows."""
    length = max(lengths) + extra_padding
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    idx = torch.randint(vocab_size, (len(lengths), length), generator=torch.Generator().manual_seed(seed))
    case = {"config": config, "state": state, "idx": idx, "attention_mask": padding_mask(lengths, length, side),
            "dtype": dtype}
    return case | ({"id": id} if id else {})


def ragged_strategy() -> st.SearchStrategy[dict[str, Any]]:
    """Padded batches of 1-4 rows of 1-24 real tokens, padded left or right."""
    return st.builds(
        ragged_case,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 24), min_size=1, max_size=4),
        side=st.sampled_from(["left", "right"]),
        n_layer=st.integers(1, 3),
        n_head=st.integers(1, 4),
        head_dim=st.sampled_from([2, 4, 8, 16]),
        vocab_size=st.integers(2, 80),
        bias=st.booleans(),
        extra_padding=st.integers(0, 3),
    )
