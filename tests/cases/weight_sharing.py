"""Cases for project 19: GPT shapes to count (tied / untied, shared, factorized), small GPTs whose tied
gradient is compared with an untied copy's, and layer-shared GPTs that generate with and without a cache."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from tests.cases.gpt import random_gpt


def shape_case(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, tied: bool,
               id: str | None = None, **variant: Any) -> dict[str, Any]:
    """Keyword arguments of a parameter count: the five shape numbers, ``tied`` and any ``variant``
    (``layer_groups``, ``embed_dim``)."""
    case = dict(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                tied=tied, **variant)
    return case | ({"id": id} if id else {})


gpt2_shapes = Cases(
    edge=[
        shape_case(50257, 1024, 12, 12, 768, True, id="gpt2-small-tied-124439808"),
        shape_case(50257, 1024, 12, 12, 768, False, id="gpt2-small-untied-163037184"),
        shape_case(50257, 1024, 24, 16, 1024, False, id="gpt2-medium-untied"),
        shape_case(4096, 256, 6, 4, 256, False, id="bpe-base-shape-untied"),
        shape_case(2, 1, 1, 1, 1, False, id="smallest-untied"),
    ],
    strategy=st.builds(
        lambda v, p, layers, heads, hd, tied: shape_case(v, p, layers, heads, heads * hd, tied),
        v=st.integers(2, 60_000), p=st.integers(1, 2048), layers=st.integers(1, 24), heads=st.integers(1, 16),
        hd=st.integers(1, 96), tied=st.booleans(),
    ),
)


@st.composite
def _partition(draw, n_layer: int) -> list[list[int]]:
    """A random set of disjoint groups over range(n_layer) (not necessarily contiguous; some layers alone)."""
    labels = draw(st.lists(st.integers(0, n_layer - 1), min_size=n_layer, max_size=n_layer))
    groups: dict[int, list[int]] = {}
    for layer, label in enumerate(labels):
        groups.setdefault(label, []).append(layer)
    return [g for g in groups.values() if len(g) > 1]


@st.composite
def _variant_shapes(draw) -> dict[str, Any]:
    n_layer, heads, hd = draw(st.integers(1, 12)), draw(st.integers(1, 8)), draw(st.integers(1, 64))
    n_embd = heads * hd
    factorized = draw(st.booleans())
    tied = True if factorized else draw(st.booleans())
    variant: dict[str, Any] = {"layer_groups": draw(_partition(n_layer))}
    if factorized:
        variant["embed_dim"] = draw(st.integers(1, n_embd))
    return shape_case(draw(st.integers(2, 60_000)), draw(st.integers(1, 1024)), n_layer, heads, n_embd, tied,
                      **variant)


variant_shapes = Cases(
    edge=[
        shape_case(50257, 1024, 12, 12, 768, True, layer_groups=[list(range(12))], id="gpt2-small-all-shared"),
        shape_case(50257, 1024, 12, 12, 768, False, layer_groups=[[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]],
                   id="gpt2-small-two-groups-untied"),
        shape_case(30000, 512, 12, 12, 768, True, layer_groups=[list(range(12))], embed_dim=128,
                   id="albert-base-like-shared-and-factorized"),
        shape_case(2048, 128, 4, 4, 128, True, embed_dim=32, id="bpe-small-shape-factorized"),
        shape_case(2048, 128, 4, 4, 128, True, layer_groups=[[1, 3]], id="non-contiguous-pair"),
        shape_case(2, 1, 1, 1, 1, True, layer_groups=[], embed_dim=1, id="smallest"),
    ],
    strategy=_variant_shapes(),
)


def grad_case(seed: int, batch: int, length: int, n_layer: int, n_head: int, head_dim: int, vocab_size: int,
              bias: bool = True, id: str | None = None) -> dict[str, Any]:
    """A random tied GPT and a batch of (inputs, next-token targets) drawn from ``seed``."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    ids = torch.randint(vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(seed))
    case = {"config": config, "state": state, "idx": ids[:, :-1], "targets": ids[:, 1:], "dtype": torch.float32}
    return case | ({"id": id} if id else {})


tied_batches = Cases(
    edge=[
        grad_case(0, 1, 1, 1, 1, 4, 7, id="one-token"),
        grad_case(1, 2, 16, 2, 2, 8, 50, id="two-layers"),
        grad_case(2, 3, 9, 1, 3, 4, 300, id="vocab-larger-than-tokens-seen"),
        grad_case(3, 2, 12, 2, 2, 8, 11, bias=False, id="no-bias"),
    ],
    strategy=st.builds(grad_case, seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, 16),
                       n_layer=st.integers(1, 2), n_head=st.integers(1, 3), head_dim=st.sampled_from([2, 4, 8]),
                       vocab_size=st.integers(2, 120), bias=st.booleans()),
)


def prompt_case(seed: int, batch: int, prompt_len: int, max_new_tokens: int, n_layer: int,
                groups: list[list[int]], n_head: int = 4, head_dim: int = 8, vocab_size: int = 65,
                id: str | None = None) -> dict[str, Any]:
    """A peaked random GPT (no near-ties for float rounding to flip), its layers to share, and prompts."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, block_size=prompt_len + max_new_tokens,
                               peaked=True)
    prompt = torch.randint(vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    case = {"config": config, "state": state, "groups": groups, "prompt": prompt, "max_new_tokens": max_new_tokens}
    return case | ({"id": id} if id else {})


@st.composite
def _shared_prompts(draw) -> dict[str, Any]:
    n_layer = draw(st.integers(2, 4))
    return prompt_case(draw(st.integers(0, 2**16)), draw(st.integers(1, 2)), draw(st.integers(1, 16)),
                       draw(st.integers(2, 24)), n_layer, draw(_partition(n_layer)),
                       n_head=draw(st.sampled_from([1, 2, 4])), head_dim=draw(st.sampled_from([4, 8])))


shared_prompts = Cases(
    edge=[
        prompt_case(0, 1, 8, 24, 4, [[0, 1, 2, 3]], id="albert-all-shared"),
        prompt_case(1, 2, 5, 20, 4, [[0, 1], [2, 3]], id="two-groups-batch-of-two"),
        prompt_case(2, 1, 1, 30, 2, [[0, 1]], id="one-token-prompt"),
        prompt_case(3, 1, 12, 16, 3, [[0, 2]], id="non-contiguous-pair"),
        prompt_case(4, 1, 6, 12, 4, [], id="unshared"),
    ],
    strategy=_shared_prompts(),
)
