"""Cases and properties for project 21: MoE layers (fp64) for naive == fast, load-balancing hand examples, and
batched setups for expert-parallel on 2 ranks == one process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases


def layer_case(seed: int, n: int, n_experts: int, top_k: int, capacity_factor: float | None,
               renormalize: bool = True, c: int = 8, h: int = 12, skew: float = 0.0,
               id: str | None = None) -> dict[str, Any]:
    """Random fp64 tokens and weights of an MoE feed-forward. ``skew`` > 0 points the router's expert 0 at
    the tokens' common direction, so most tokens pick it and a small capacity must drop some."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    common = torch.randn(c, generator=g, dtype=d)
    x = torch.randn(n, c, generator=g, dtype=d) + skew * common
    router = torch.randn(n_experts, c, generator=g, dtype=d)
    router[0] += skew * common
    case = {
        "x": x, "router_weight": router,
        "w_fc": torch.randn(n_experts, c, h, generator=g, dtype=d) * 0.3,
        "b_fc": torch.randn(n_experts, h, generator=g, dtype=d) * 0.1,
        "w_proj": torch.randn(n_experts, h, c, generator=g, dtype=d) * 0.3,
        "b_proj": torch.randn(n_experts, c, generator=g, dtype=d) * 0.1,
        "upstream": torch.randn(n, c, generator=g, dtype=d),
        "top_k": top_k, "capacity_factor": capacity_factor, "renormalize": renormalize,
    }
    return case | ({"id": id} if id else {})


@st.composite
def _layer_strategy(draw: Any) -> dict[str, Any]:
    n_experts = draw(st.integers(1, 6))
    return layer_case(seed=draw(st.integers(0, 2**16)), n=draw(st.integers(1, 16)), n_experts=n_experts,
                      top_k=draw(st.integers(1, n_experts)),
                      capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 1.25, 2.0])),
                      renormalize=draw(st.booleans()), skew=draw(st.sampled_from([0.0, 2.0])))


moe_layers = Cases(
    edge=[
        layer_case(0, 12, 4, 1, 0.5, renormalize=False, skew=3.0, id="top1-capacity-drops"),
        layer_case(1, 10, 4, 2, None, id="top2-renormalized-no-limit"),
        layer_case(2, 12, 4, 2, 0.75, skew=2.0, id="top2-second-choices-dropped"),
        layer_case(3, 9, 3, 3, 1.0, id="top-k-equals-experts"),
        layer_case(4, 1, 2, 1, 1.25, renormalize=False, id="one-token"),
        layer_case(5, 16, 8, 2, 1.25, renormalize=False, id="top2-raw-gates"),
    ],
    strategy=_layer_strategy(),
)

# ------------------------------------------------------------------ load balancing


def _aux_hand(probs: list[list[float]], experts: list[list[int]], alpha: float, choices: str, expected: float,
              id: str) -> dict[str, Any]:
    return {"probs": torch.tensor(probs, dtype=torch.float64), "experts": torch.tensor(experts),
            "alpha": alpha, "choices": choices, "expected": expected, "id": id}


def aux_case(seed: int, n: int, n_experts: int, top_k: int, alpha: float, choices: str) -> dict[str, Any]:
    """Router probabilities (softmax of random logits) and their top-k experts."""
    g = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(n, n_experts, generator=g, dtype=torch.float64)).softmax(-1)
    return {"probs": probs, "experts": probs.topk(top_k, dim=-1).indices, "alpha": alpha, "choices": choices}


@st.composite
def _aux_strategy(draw: Any) -> dict[str, Any]:
    e = draw(st.integers(1, 8))
    return aux_case(draw(st.integers(0, 2**16)), draw(st.integers(1, 40)), e, draw(st.integers(1, e)),
                    draw(st.sampled_from([0.01, 0.1, 1.0])), draw(st.sampled_from(["first", "all"])))


aux_examples = Cases(
    edge=[
        # f = (3/4, 1/4), P = ((.7+.6+.2+.9)/4, (.3+.4+.8+.1)/4) = (.6, .4): 1 * 2 * (.75 * .6 + .25 * .4) = 1.1
        _aux_hand([[.7, .3], [.6, .4], [.2, .8], [.9, .1]], [[0], [0], [1], [0]], 1.0, "first", 1.1,
                  id="hand-two-experts"),
        # uniform router, each expert first choice of one token: f = P = 1/4 -> alpha * 4 * 4 / 16 = alpha
        _aux_hand([[.25] * 4] * 4, [[0], [1], [2], [3]], 0.01, "first", 0.01, id="balanced-equals-alpha"),
        # top-2, first choices (0, 0, 1) -> f = (2/3, 1/3, 0); P = (.5, .3, .2):
        # 0.1 * 3 * (2/3 * .5 + 1/3 * .3) = 0.13
        _aux_hand([[.6, .3, .1], [.5, .2, .3], [.4, .4, .2]], [[0, 1], [0, 2], [1, 0]], 0.1, "first", 0.13,
                  id="top2-first-choices"),
        # same, all choices: counts (3, 2, 1) / 6 -> 0.1 * 3 * (.5 * .5 + 1/3 * .3 + 1/6 * .2) = 0.115
        _aux_hand([[.6, .3, .1], [.5, .2, .3], [.4, .4, .2]], [[0, 1], [0, 2], [1, 0]], 0.1, "all", 0.115,
                  id="top2-all-choices"),
    ],
    strategy=_aux_strategy(),
)


def matches_switch_formula(fn: Callable, probs: torch.Tensor, experts: torch.Tensor, alpha: float, choices: str,
                           expected: float | None = None) -> None:
    """Property: the loss is ``alpha * E * sum_i f_i * P_i`` (f_i: share of first / all choices on expert i,
    P_i: mean probability of expert i), recomputed here entry by entry, and the hand example's number."""
    n, e = probs.shape
    chosen = experts[:, :1] if choices == "first" else experts
    f = [sum(int(v) == i for v in chosen.flatten()) / chosen.numel() for i in range(e)]
    p = [sum(float(probs[t, i]) for t in range(n)) / n for i in range(e)]
    formula = alpha * e * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    got = float(fn(probs, experts, alpha, choices))
    assert abs(got - formula) <= 1e-12 * max(1.0, abs(formula)), \
        f"loss {got!r} != alpha * E * sum f_i P_i = {formula!r}"
    if expected is not None:
        assert abs(got - expected) <= 1e-12, f"loss {got!r} != the hand-computed {expected!r}"


# ------------------------------------------------------------------ expert parallel


def ep_setup(seed: int, n: int, n_experts: int, top_k: int, capacity_factor: float | None, skew: float = 0.0,
             renormalize: bool = True) -> dict[str, Any]:
    """Two ranks' batches ``x`` (2, N, C) and one set of weights (fp64)."""
    a = layer_case(seed, n, n_experts, top_k, capacity_factor, renormalize, skew=skew)
    b = layer_case(seed + 1, n, n_experts, top_k, capacity_factor, renormalize, skew=skew)
    return a | {"x": torch.stack([a["x"], b["x"]]), "upstream": torch.stack([a["upstream"], b["upstream"]])}


ep_setups = Cases(
    edge=[{"setups": [
        ep_setup(0, 8, 4, 1, 1.0, renormalize=False),
        ep_setup(10, 8, 4, 2, None),
        ep_setup(20, 12, 4, 2, 0.75, skew=2.0),
        ep_setup(30, 6, 2, 1, 1.25, renormalize=False),
        ep_setup(40, 10, 8, 2, 1.25, skew=1.0),
    ], "id": "five-setups-one-spawn"}],
    strategy=st.builds(lambda seeds, e, k, cf: {"setups": [ep_setup(s, 8, e, min(k, e), cf) for s in seeds]},
                       st.lists(st.integers(0, 2**16), min_size=1, max_size=3), st.sampled_from([2, 4, 6]),
                       st.integers(1, 2), st.sampled_from([None, 0.75, 1.25])),
)
