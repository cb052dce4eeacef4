"""Cases for project 22 (memory-efficient attention): any number of key pieces, and the LSE merge.

``num_splits`` runs from 1 (unsplit) to more pieces than there are keys (empty pieces), on odd
lengths, decoding (T = 1) and chunks after a cache (T < S). ``huge`` cases have scores of
several hundred, where exp() overflows float32 unless the merge subtracts the maximum first.
The Triton cases are tiny: the split-K kernel runs one interpreted program per (row, piece).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.flash_attention.naive import attention_with_lse
from tests.cases.flash_attention import DTYPES, attention_case


def split_case(
    B: int, nh: int, T: int, S: int, hs: int, causal: bool, num_splits: int, seed: int = 0, huge: bool = False
) -> dict:
    """An attention case (see ``attention_case``) with ``num_splits`` key pieces.

    ``huge``: q and k hold integers in [-16, 16], so that scores reach a few hundred, far past
    where exp() overflows float32 (~88), and yet are exact in float32 and bf16 (hs 16 or 64:
    1/sqrt(hs) is a power of two), so that only the merge, not rounded scores, is under test.
    """
    case = attention_case(B, nh, T, S, hs, causal, seed=seed)
    if huge:
        g = torch.Generator().manual_seed(seed)
        case["q"] = torch.randint(-16, 17, case["q"].shape, generator=g).float()
        case["k"] = torch.randint(-16, 17, case["k"].shape, generator=g).float()
    return {**case, "num_splits": num_splits}


def _edge(shapes: list[tuple]) -> list[dict]:
    return [
        {"id": f"{sid}-{name}", "dtype": dtype, **split_case(*shape, seed=i, huge=huge)}
        for name, dtype in DTYPES.items()
        for i, (sid, shape, huge) in enumerate(shapes)
    ]


# (id, (B, nh, T, S, hs, causal, num_splits), huge logits)
SPLIT_SHAPES = [
    ("seq1-unsplit", (1, 2, 1, 1, 16, True, 1), False),
    ("seq1-4-splits", (1, 2, 1, 1, 16, True, 4), False),
    ("decode-239-unsplit", (1, 2, 1, 239, 80, True, 1), False),
    ("decode-239-7-splits", (1, 2, 1, 239, 64, True, 7), False),
    ("decode-7-keys-12-splits", (2, 2, 1, 7, 40, True, 12), False),
    ("prefill-113-3-splits", (1, 2, 113, 113, 40, True, 3), False),
    ("prefill-239-16-splits", (1, 2, 239, 239, 128, False, 16), False),
    ("cache-37x239-5-splits", (1, 2, 37, 239, 64, True, 5), False),
    ("prefill-300-2-query-chunks", (1, 1, 300, 300, 16, True, 2), False),
    ("huge-logits-decode-4-splits", (1, 2, 1, 64, 64, True, 4), True),
    ("huge-logits-cache-40x64-3-splits", (1, 1, 40, 64, 16, True, 3), True),
]

DECODE_SHAPES = [
    ("one-key", (1, 1, 1, 1, 16, True, 1), False),
    ("decode-239-3-splits-hs80", (1, 2, 1, 239, 80, True, 3), False),
    ("decode-7-keys-10-splits", (2, 1, 1, 7, 40, True, 10), False),
    ("decode-130-2-splits-hs24", (1, 1, 1, 130, 24, True, 2), False),
    ("cache-3x50-4-splits", (1, 1, 3, 50, 64, True, 4), False),
    ("huge-logits-64-2-splits", (1, 2, 1, 64, 64, False, 2), True),
]


@st.composite
def _split_cases(draw: st.DrawFn, max_rows: int, max_s: int, max_splits: int) -> dict:
    T = draw(st.integers(1, max_rows))
    S = draw(st.integers(T, max_s))
    num_splits = draw(st.one_of(st.just(1), st.integers(1, max_splits), st.integers(S, S + 5)))
    huge = draw(st.sampled_from([False, False, True]))
    case = split_case(
        B=draw(st.integers(1, 2)),
        nh=draw(st.integers(1, 2)),
        T=T,
        S=S,
        hs=draw(st.sampled_from([16, 64] if huge else [16, 24, 40, 64])),
        causal=draw(st.booleans()),
        num_splits=min(num_splits, max_splits),
        seed=draw(st.integers(0, 2**16)),
        huge=huge,
    )
    return {"dtype": draw(st.sampled_from(list(DTYPES.values()))), **case}


splits = Cases(edge=_edge(SPLIT_SHAPES), strategy=_split_cases(max_rows=40, max_s=100, max_splits=105))
decode = Cases(edge=_edge(DECODE_SHAPES), strategy=_split_cases(max_rows=2, max_s=60, max_splits=8))


def combine_matches_unsplit(
    fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, cuts: list[int]
) -> None:
    """Property: partials over the key pieces cut at ``cuts``, merged by ``fn``, equal the unsplit
    output and LSE (float64 truth) within float32 tolerance.

    Each partial is computed here from the full score matrix: an empty piece, or a row that sees
    none of a piece's keys, has lse = -inf and output 0.
    """
    T, S, hs = q.shape[2], k.shape[2], q.shape[3]
    scores = q @ k.transpose(-2, -1) / hs**0.5  # (B, nh, T, S)
    if causal:
        visible = torch.arange(S).view(1, S) <= torch.arange(T).view(T, 1) + (S - T)
        scores = scores.masked_fill(~visible, float("-inf"))
    o_parts, lse_parts = [], []
    for a, b in zip([0, *cuts], [*cuts, S], strict=True):
        lse = torch.logsumexp(scores[..., a:b], dim=-1)  # (B, nh, T)
        p = torch.exp(scores[..., a:b] - lse.unsqueeze(-1)).nan_to_num(0.0)  # unseen rows: 0, not NaN
        o_parts.append(p @ v[:, :, a:b])
        lse_parts.append(lse)
    o, lse = fn(torch.stack(o_parts), torch.stack(lse_parts))
    o_true, lse_true = attention_with_lse(q.double(), k.double(), v.double(), causal)
    assert torch.allclose(o.double(), o_true, rtol=1e-5, atol=1e-5), (
        f"merged output off by {(o.double() - o_true).abs().max():.3g} for cuts {cuts}"
    )
    assert torch.allclose(lse.double(), lse_true, rtol=1e-5, atol=1e-5), (
        f"merged LSE off by {(lse.double() - lse_true).abs().max():.3g} for cuts {cuts}"
    )


def partial_case(
    T: int, S: int, hs: int, causal: bool, cuts: list[int], seed: int = 0, huge: bool = False
) -> dict:
    """q, k, v float32, the causal flag and sorted cut points in [0, S] (repeats give empty pieces)."""
    case = split_case(1, 2, T, S, hs, causal, num_splits=1, seed=seed, huge=huge)
    del case["num_splits"]
    return {**case, "cuts": sorted(cuts)}


@st.composite
def _partial_cases(draw: st.DrawFn) -> dict:
    S = draw(st.integers(1, 60))
    return partial_case(
        T=draw(st.integers(1, S)),
        S=S,
        hs=draw(st.sampled_from([16, 40])),
        causal=draw(st.booleans()),
        cuts=draw(st.lists(st.integers(0, S), max_size=8)),
        seed=draw(st.integers(0, 2**16)),
        huge=draw(st.booleans()),
    )


partials = Cases(
    edge=[
        {"id": "one-piece", **partial_case(5, 9, 16, True, [])},
        {"id": "every-key-its-own-piece", **partial_case(4, 9, 16, True, list(range(1, 9)))},
        {"id": "empty-pieces", **partial_case(3, 12, 16, True, [0, 0, 5, 5, 12, 12])},
        {"id": "causal-row-sees-no-key-of-last-piece", **partial_case(6, 6, 40, True, [3])},
        {"id": "huge-logits", **partial_case(4, 20, 16, False, [7, 13], huge=True)},
    ],
    strategy=_partial_cases(),
)
