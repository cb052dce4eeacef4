"""Cases for project 23: small GPTs (fp64, so "equal" means equal to rounding) and a batch to take one
training step on, for 2 tensor-parallel ranks against one process."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from tests.cases.gpt import random_gpt


def step_case(seed: int, batch: int, length: int, n_layer: int, n_head: int, head_dim: int, vocab_size: int,
              bias: bool = True, world: int = 2, id: str | None = None) -> dict[str, Any]:
    """A random GPT (config, fp64 state), token ids and next-token targets (B, T), a learning rate large
    enough that one AdamW step visibly moves every weight, and the number of ranks."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(vocab_size, (batch, length + 1), generator=gen)
    case = {"config": config, "state": state, "idx": tokens[:, :-1].clone(), "targets": tokens[:, 1:].clone(),
            "lr": 1e-2, "world": world, "dtype": torch.float64}
    return case | ({"id": id} if id else {})


train_steps = Cases(
    edge=[
        step_case(0, batch=2, length=16, n_layer=2, n_head=4, head_dim=8, vocab_size=64, id="2-layers-4-heads"),
        step_case(1, batch=1, length=5, n_layer=1, n_head=2, head_dim=4, vocab_size=6, bias=False,
                  id="one-head-per-rank-no-bias-tiny-vocab"),
    ],
    strategy=st.builds(
        step_case, seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, 12),
        n_layer=st.integers(1, 2), n_head=st.sampled_from([2, 4, 6]), head_dim=st.sampled_from([2, 4, 8]),
        vocab_size=st.sampled_from([2, 10, 32, 66]), bias=st.booleans(),
    ),
)
