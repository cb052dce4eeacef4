"""Cases for project 12 (and the engine checks of project 10): ragged prompts with their own output lengths,
engine knobs that force chunked prefill and preemption, random arrival steps."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.engine.runs import alone
from tests.cases.gpt import random_gpt

VOCAB = 61


def requests_case(seed: int, lengths: list[int], max_tokens: list[int], stop_ids: tuple[int, ...] = (),
                  max_num_seqs: int = 4, max_batched_tokens: int = 64, block_size: int = 8,
                  num_blocks: int | None = None, n_layer: int = 2, n_head: int = 2, head_dim: int = 8,
                  arrive_at: list[int] | None = None, shared_prefix: int = 0, spare_blocks: int | None = None,
                  id: str | None = None) -> dict[str, Any]:
    """A peaked random GPT and one request per prompt length; the first ``shared_prefix`` ids of every prompt
    are the same (a system prompt, for the prefix cache). ``spare_blocks``: a pool only that many blocks larger
    than the largest request needs (preemption), instead of ``num_blocks``."""
    context = max(lengths) + shared_prefix + max(max_tokens) + 1
    if spare_blocks is not None:
        largest = max(n + shared_prefix + m for n, m in zip(lengths, max_tokens, strict=False))
        num_blocks = -(-largest // block_size) + spare_blocks
    config, state = random_gpt(seed, n_layer, n_head, head_dim, VOCAB, block_size=context, peaked=True)
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(VOCAB, (shared_prefix,), generator=gen).tolist()
    prompts = [prefix + torch.randint(VOCAB, (n,), generator=gen).tolist() for n in lengths]
    case = {"config": config, "state": state, "prompts": prompts, "max_tokens": max_tokens,
            "stop_ids": stop_ids, "max_num_seqs": max_num_seqs, "max_batched_tokens": max_batched_tokens,
            "block_size": block_size, "num_blocks": num_blocks}
    if arrive_at is not None:
        case["arrive_at"] = arrive_at
    return case | ({"id": id} if id else {})


requests = Cases(
    edge=[
        requests_case(0, [5], [9], id="one-request"),
        requests_case(1, [3, 17, 1, 9, 12, 6], [20, 3, 11, 1, 25, 7], id="more-requests-than-rows"),
        requests_case(2, [30, 2], [5, 30], max_batched_tokens=8, id="chunked-prefill"),
        requests_case(3, [10, 14, 6, 9, 11], [24, 24, 24, 24, 24], num_blocks=10, block_size=4,
                      id="preemption"),
        requests_case(4, [4, 8, 12, 16], [16, 16, 16, 16], stop_ids=(3, 7, 11, 19, 23), id="stop-ids"),
        requests_case(5, [6, 9, 2], [12, 4, 8], block_size=1, id="block-of-one"),
    ],
    strategy=st.builds(
        requests_case,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 20), min_size=1, max_size=6),
        max_tokens=st.lists(st.integers(1, 24), min_size=6, max_size=6),
        max_num_seqs=st.integers(1, 5),
        max_batched_tokens=st.integers(1, 48),
        block_size=st.sampled_from([1, 2, 4, 8, 16]),
        spare_blocks=st.sampled_from([None, 0, 1, 3]),
    ).map(lambda c: c | {"max_tokens": c["max_tokens"][: len(c["prompts"])]}),
)

def reordered_blocks_case(seed: int, block_size: int = 4, id: str | None = None) -> dict[str, Any]:
    """Two prompts made of the same two blocks in opposite orders (then a distinct question), served one after
    the other: a cache that found blocks by their tokens alone would hand the second prompt keys and values
    computed at other positions after another past."""
    n = 2 * block_size + 3
    case = requests_case(seed, [n, n], [6, 6], max_num_seqs=1, block_size=block_size, id=id)
    a, x = case["prompts"][0][:block_size], case["prompts"][0][block_size : 2 * block_size]
    case["prompts"] = [a + x + case["prompts"][0][-3:], x + a + case["prompts"][1][-3:]]
    return case


shared_prefix_requests = Cases(
    edge=[
        reordered_blocks_case(13, id="same-blocks-other-order"),
        requests_case(10, [3, 5, 1, 8], [6, 6, 6, 6], shared_prefix=20, block_size=4, id="system-prompt"),
        requests_case(11, [1, 1], [5, 9], shared_prefix=16, block_size=8, id="prefix-is-whole-blocks"),
        requests_case(12, [4, 4, 4], [10, 10, 10], shared_prefix=13, num_blocks=14, block_size=4,
                      id="prefix-under-preemption"),
    ],
    strategy=st.builds(
        requests_case,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
        max_tokens=st.lists(st.integers(1, 16), min_size=5, max_size=5),
        shared_prefix=st.integers(0, 24),
        max_num_seqs=st.integers(1, 4),
        block_size=st.sampled_from([1, 2, 4, 8]),
        spare_blocks=st.sampled_from([None, 0, 2]),
    ).map(lambda c: c | {"max_tokens": c["max_tokens"][: len(c["prompts"])]}),
)


def _arrivals(seed: int, lengths: list[int], max_tokens: list[int], gaps: list[int], **kw) -> dict[str, Any]:
    steps, at = 0, []
    for gap in gaps[: len(lengths)]:
        steps += gap
        at.append(steps)
    return requests_case(seed, lengths, max_tokens[: len(lengths)], arrive_at=at, **kw)


arrivals = Cases(
    edge=[
        _arrivals(20, [4, 9, 2, 7, 5], [10, 3, 12, 6, 8], [0, 1, 0, 5, 2], id="staggered"),
        _arrivals(21, [12, 12, 12, 12, 12, 12], [20] * 6, [0, 0, 3, 0, 4, 0], num_blocks=12, block_size=4,
                  max_num_seqs=3, id="arrivals-under-preemption"),
    ],
    strategy=st.builds(
        _arrivals,
        seed=st.integers(0, 2**16),
        lengths=st.lists(st.integers(1, 16), min_size=1, max_size=7),
        max_tokens=st.lists(st.integers(1, 20), min_size=7, max_size=7),
        gaps=st.lists(st.integers(0, 6), min_size=7, max_size=7),
        max_num_seqs=st.integers(1, 4),
        max_batched_tokens=st.integers(4, 40),
        block_size=st.sampled_from([2, 4, 8]),
        spare_blocks=st.sampled_from([None, 0, 2]),
    ),
)


def completes_like_alone(fn, **case) -> None:
    """Every request finishes (within the step limit) with the tokens it gets when run alone."""
    got = fn(**case)
    want = alone(**case)
    assert got == want, f"outputs differ from each request run alone: {got} != {want}"
