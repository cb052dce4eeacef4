"""Cases for project 4: small batches of chat-shaped examples (untrained prompt runs, trained answer
runs, several turns) on a random GPT."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.sft.fast import Example, shift
from impl.sft.templates import IGNORE_INDEX
from tests.cases.gpt import random_gpt


def chat_example(gen: torch.Generator, vocab_size: int, turns: list[tuple[int, int]]) -> Example:
    """Token ids in turns of (prompt tokens, answer tokens): labels are the ids on answer tokens only."""
    ids: list[int] = []
    labels: list[int] = []
    for prompt, answer in turns:
        p = torch.randint(vocab_size, (prompt,), generator=gen).tolist()
        a = torch.randint(vocab_size, (answer,), generator=gen).tolist()
        ids += p + a
        labels += [IGNORE_INDEX] * prompt + a
    return shift(ids, labels)


def batch_case(seed: int, shapes: list[list[tuple[int, int]]], pack: int | None = None, n_layer: int = 2,
               n_head: int = 2, head_dim: int = 8, vocab_size: int = 61, id: str | None = None) -> dict[str, Any]:
    """A random GPT and one example per entry of ``shapes`` (its turns); ``pack`` defaults to the longest
    example plus 7 tokens, so most rows hold several examples and some padding."""
    gen = torch.Generator().manual_seed(seed)
    examples = [chat_example(gen, vocab_size, turns) for turns in shapes]
    longest = max(map(len, examples))
    pack = max(pack or longest + 7, longest)
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, block_size=pack)
    case = {"config": config, "state": state, "examples": examples, "pack": pack}
    return case | ({"id": id} if id else {})


turn = st.tuples(st.integers(1, 8), st.integers(1, 6))  # (prompt tokens, answer tokens)
batches = Cases(
    edge=[
        batch_case(0, [[(3, 2)]], id="one-example"),
        batch_case(1, [[(4, 3)], [(2, 5)]], id="two-examples"),
        batch_case(2, [[(5, 1)], [(1, 1)], [(7, 4)]], id="one-token-answers"),
        batch_case(3, [[(3, 2), (4, 3)], [(2, 2)]], id="two-turns"),
        batch_case(4, [[(2, 3)], [(2, 3)], [(2, 3)], [(2, 3)]], pack=12, id="exact-fit-rows"),
        batch_case(5, [[(6, 6)], [(1, 2)], [(3, 1)], [(2, 2)], [(8, 3)]], id="five-examples"),
    ],
    strategy=st.builds(
        batch_case,
        seed=st.integers(0, 2**16),
        shapes=st.lists(st.lists(turn, min_size=1, max_size=3), min_size=1, max_size=5),
        n_layer=st.integers(1, 2),
        n_head=st.sampled_from([1, 2]),
    ),
)
