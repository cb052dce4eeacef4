"""Cases for project 3: gradients with and without checkpointing, interrupted-and-resumed runs,
and the parameter count of GPT shapes up to (and beyond) 125M."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.pretrain.config import gpt_125m, shape_of
from tests.cases.gpt import random_gpt


def grad_case(seed: int, batch: int, length: int, n_layer: int, n_head: int, head_dim: int,
              vocab_size: int = 50, bias: bool = True, dtype: torch.dtype = torch.float32,
              id: str | None = None) -> dict[str, Any]:
    """A random GPT and a batch of (inputs, next-token targets) drawn from ``seed``."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (batch, length + 1), generator=gen)
    case = {"config": config, "state": state, "idx": ids[:, :-1], "targets": ids[:, 1:], "dtype": dtype}
    return case | ({"id": id} if id else {})


gradients = Cases(
    edge=[
        grad_case(0, 1, 1, 1, 1, 4, id="one-token-one-layer"),
        grad_case(1, 2, 32, 4, 2, 8, id="four-layers"),
        grad_case(2, 3, 17, 3, 3, 4, vocab_size=11, id="odd-heads-and-length"),
        grad_case(3, 2, 16, 2, 2, 8, bias=False, id="no-bias"),
        grad_case(4, 2, 24, 3, 2, 8, dtype=torch.bfloat16, id="bf16"),
    ],
    strategy=st.builds(
        grad_case,
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 3),
        length=st.integers(1, 24),
        n_layer=st.integers(1, 4),
        n_head=st.integers(1, 4),
        head_dim=st.sampled_from([2, 4, 8]),
        vocab_size=st.integers(2, 60),
        bias=st.booleans(),
    ),
)


def run_case(seed: int = 0, n_layer: int = 2, n_head: int = 2, n_embd: int = 16, vocab_size: int = 32,
             block_size: int = 16, batch_size: int = 4, max_iters: int = 20, eval_interval: int = 5,
             dropout: float = 0.1, grad_accum_steps: int = 1, precision: str = "fp32",
             interrupt_at: int = 10, id: str | None = None) -> dict[str, Any]:
    """A tiny pre-training run (~20 iterations) and where it is interrupted."""
    case = dict(seed=seed, n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                block_size=block_size, batch_size=batch_size, max_iters=max_iters,
                eval_interval=eval_interval, dropout=dropout, grad_accum_steps=grad_accum_steps,
                precision=precision, interrupt_at=interrupt_at)
    return case | ({"id": id} if id else {})


runs = Cases(
    edge=[
        run_case(interrupt_at=10, id="interrupted-at-a-checkpoint"),
        run_case(seed=1, interrupt_at=13, grad_accum_steps=2, id="interrupted-between-checkpoints"),
        run_case(seed=2, interrupt_at=1, dropout=0.0, id="interrupted-after-one-step"),
        run_case(seed=3, interrupt_at=17, precision="bf16", id="bf16-autocast"),
    ],
    strategy=st.builds(
        run_case,
        seed=st.integers(0, 2**16),
        max_iters=st.integers(4, 20),
        eval_interval=st.integers(1, 7),
        dropout=st.sampled_from([0.0, 0.2]),
        grad_accum_steps=st.integers(1, 2),
        interrupt_at=st.integers(1, 19),
    ).filter(lambda case: case["interrupt_at"] < case["max_iters"]),
)


def shape_case(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
               id: str | None = None) -> dict[str, Any]:
    case = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    return case | ({"id": id} if id else {})


shapes = Cases(
    edge=[
        {**shape_of(gpt_125m()), "id": "ours-125m"},
        shape_case(50257, 1024, 12, 12, 768, id="gpt2-small-124m"),
        shape_case(10_000, 1024, 12, 12, 768, id="gpt2-small-shape-10k-vocab"),
        shape_case(2, 1, 1, 1, 1, id="smallest"),
    ],
    strategy=st.builds(
        lambda vocab_size, block_size, n_layer, n_head, head_dim: shape_case(
            vocab_size, block_size, n_layer, n_head, n_head * head_dim),
        vocab_size=st.integers(2, 70_000),
        block_size=st.integers(1, 4096),
        n_layer=st.integers(1, 48),
        n_head=st.integers(1, 32),
        head_dim=st.integers(1, 128),
    ),
)
