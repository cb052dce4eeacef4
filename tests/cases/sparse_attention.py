"""Cases for project 20: sparse attention patterns, block-sparse vs dense-masked, learned routing."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.sparse_attention.patterns import PATTERN_KINDS, build_layout, num_blocks


def _qkv(seed: int, B: int, nh: int, T: int, hs: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, nh, T, hs, generator=gen) for _ in range(3))


def attention_case(
    seed: int, kind: str, T: int, block_size: int, causal: bool, B: int = 1, nh: int = 2, hs: int = 8,
    window: int = 1, n_global: int = 1, n_random: int = 2, stride: int = 2,
    dtype: torch.dtype = torch.float32, id: str | None = None,
) -> dict[str, Any]:
    """q, k, v and the layout of one pattern; ``kind = "per_head"`` draws a random layout per
    batch element and head (diagonal kept), the shape a learned pattern has."""
    q, k, v = _qkv(seed, B, nh, T, hs)
    n = num_blocks(T, block_size)
    if kind == "per_head":
        gen = torch.Generator().manual_seed(seed + 1)
        layout = (torch.rand(B, nh, n, n, generator=gen) < 0.3) | torch.eye(n, dtype=torch.bool)
    else:
        layout = build_layout(kind, n, causal, window, n_global, n_random, seed, stride)
    case = {"q": q, "k": k, "v": v, "layout": layout, "block_size": block_size, "causal": causal,
            "dtype": dtype}
    return case | ({"id": id} if id else {})


patterned = Cases(
    edge=[
        attention_case(0, "window", 64, 16, True, id="window-causal"),
        attention_case(1, "window", 64, 8, False, window=2, n_global=2, id="window-globals-see-all"),
        attention_case(2, "bigbird", 96, 8, True, id="bigbird-causal"),
        attention_case(3, "bigbird", 96, 8, False, window=0, n_global=0, n_random=3,
                       id="bigbird-random-only"),
        attention_case(4, "fixed", 64, 4, True, stride=4, id="fixed-causal"),
        attention_case(5, "fixed", 60, 4, False, stride=3, id="fixed-non-multiple"),
        attention_case(6, "window", 45, 8, True, B=2, id="length-not-multiple-of-block"),
        attention_case(7, "window", 5, 8, True, id="one-short-block"),
        attention_case(8, "window", 24, 1, True, window=3, n_global=0, id="token-level-blocks"),
        attention_case(9, "window", 32, 8, False, window=4, id="window-covers-all"),
        attention_case(10, "per_head", 40, 4, True, B=2, nh=3, id="per-head-layout"),
        attention_case(11, "bigbird", 64, 8, True, hs=16, dtype=torch.bfloat16, id="bigbird-bf16"),
    ],
    strategy=st.builds(
        attention_case,
        seed=st.integers(0, 2**16),
        kind=st.sampled_from([*PATTERN_KINDS, "per_head"]),
        T=st.integers(1, 80),
        block_size=st.sampled_from([1, 2, 4, 8, 16]),
        causal=st.booleans(),
        B=st.integers(1, 2),
        nh=st.integers(1, 3),
        hs=st.sampled_from([4, 8, 16]),
        window=st.integers(0, 3),
        n_global=st.integers(0, 2),
        n_random=st.integers(0, 3),
        stride=st.integers(1, 4),
    ),
)


def pattern_case(
    kind: str, n_blocks: int, causal: bool, window: int = 1, n_global: int = 1, n_random: int = 2,
    seed: int = 0, stride: int = 2, id: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``patterns.build_layout`` (what the pattern property check runs)."""
    case = {"kind": kind, "n_blocks": n_blocks, "causal": causal, "window": window, "n_global": n_global,
            "n_random": n_random, "seed": seed, "stride": stride}
    return case | ({"id": id} if id else {})


layouts = Cases(
    edge=[
        pattern_case("window", 16, False, window=2, n_global=1, id="window"),
        pattern_case("window", 16, True, window=3, n_global=2, id="window-causal"),
        pattern_case("window", 1, True, id="one-block"),
        pattern_case("bigbird", 32, False, window=1, n_global=1, n_random=3, seed=7, id="bigbird"),
        pattern_case("bigbird", 32, True, window=1, n_global=2, n_random=2, seed=1, id="bigbird-causal"),
        pattern_case("bigbird", 6, False, window=1, n_global=0, n_random=9, id="bigbird-fewer-candidates"),
        pattern_case("fixed", 16, False, stride=4, id="fixed"),
        pattern_case("fixed", 17, True, stride=3, id="fixed-causal-ragged"),
    ],
    strategy=st.builds(
        pattern_case,
        kind=st.sampled_from(PATTERN_KINDS),
        n_blocks=st.integers(1, 40),
        causal=st.booleans(),
        window=st.integers(0, 4),
        n_global=st.integers(0, 3),
        n_random=st.integers(0, 4),
        seed=st.integers(0, 2**16),
        stride=st.integers(1, 6),
    ),
)


def learned_case(
    seed: int, T: int, block_size: int, top_k: int, causal: bool, B: int = 2, nh: int = 2, hs: int = 8,
    route_dim: int = 4, id: str | None = None,
) -> dict[str, Any]:
    """q, k, v and random router projections (hs, route_dim) for the learned top-k pattern."""
    q, k, v = _qkv(seed, B, nh, T, hs)
    gen = torch.Generator().manual_seed(seed + 1)
    w_query, w_key = (torch.randn(hs, route_dim, generator=gen) for _ in range(2))
    case = {"q": q, "k": k, "v": v, "w_query": w_query, "w_key": w_key, "block_size": block_size,
            "top_k": top_k, "causal": causal}
    return case | ({"id": id} if id else {})


learned = Cases(
    edge=[
        learned_case(0, 64, 8, 2, True, id="causal"),
        learned_case(1, 64, 8, 2, False, id="non-causal"),
        learned_case(2, 45, 4, 3, True, id="length-not-multiple-of-block"),
        learned_case(3, 32, 8, 9, False, id="top-k-above-block-count"),
        learned_case(4, 32, 4, 0, True, id="diagonal-only"),
    ],
    strategy=st.builds(
        learned_case,
        seed=st.integers(0, 2**16),
        T=st.integers(1, 80),
        block_size=st.sampled_from([2, 4, 8, 16]),
        top_k=st.integers(0, 4),
        causal=st.booleans(),
        B=st.integers(1, 2),
        nh=st.integers(1, 3),
        hs=st.sampled_from([4, 8]),
        route_dim=st.sampled_from([2, 4, 8]),
    ),
)


def pattern_properties(build, kind: str, n_blocks: int, causal: bool, window: int, n_global: int,
                       n_random: int, seed: int, stride: int) -> None:
    """The property check of ``patterns.build_layout``: raises AssertionError naming the first
    violated rule (diagonal kept, causality, window/global/random/fixed structure, determinism)."""
    params = {"kind": kind, "n_blocks": n_blocks, "causal": causal, "window": window, "n_global": n_global,
              "n_random": n_random, "seed": seed, "stride": stride}
    layout = build(**params)
    assert layout.dtype == torch.bool and layout.shape == (n_blocks, n_blocks), (
        f"a {kind} layout must be bool ({n_blocks}, {n_blocks}), got {layout.dtype} {tuple(layout.shape)}")
    assert layout.diagonal().all(), f"the {kind} layout drops a diagonal block: some query sees no key"
    i = torch.arange(n_blocks).unsqueeze(1)
    j = i.transpose(0, 1)
    reachable = (j <= i) if causal else torch.ones(n_blocks, n_blocks, dtype=torch.bool)
    assert not (layout & ~reachable).any(), f"the causal {kind} layout keeps a block from the future"
    assert torch.equal(layout, build(**params)), f"the {kind} layout differs between two calls, seed {seed}"
    if kind == "fixed":
        expected = ((i // stride == j // stride) | (j % stride == stride - 1)) & reachable
        assert torch.equal(layout, expected), f"the fixed layout (stride {stride}) is not chunk + summary columns"
        return
    in_window = ((i - j).abs() <= window) & reachable
    assert layout[in_window].all(), f"a query block misses a block within its window of {window}"
    global_cols, global_rows = (j < n_global) & reachable, (i < n_global) & reachable
    assert layout[global_cols].all(), f"a query block does not see all {n_global} global blocks"
    assert layout[global_rows].all(), "a global block does not see every block it may reach"
    base = in_window | global_cols | global_rows
    extra = (layout & ~base).sum(-1)  # (n,) random blocks per query-block row
    candidates = (reachable & ~base).sum(-1)
    expected_extra = candidates.clamp(max=n_random if kind == "bigbird" else 0)
    expected_extra[:n_global] = 0  # global rows already see everything they may
    assert torch.equal(extra, expected_extra), (
        f"random blocks per query block are {extra.tolist()}, expected {expected_extra.tolist()} "
        f"({kind}, n_random={n_random})")


def router_properties(route, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_query: torch.Tensor,
                      w_key: torch.Tensor, block_size: int, top_k: int, causal: bool) -> None:
    """The property check of the learned router ``route(q, k, w_query, w_key, block_size, top_k,
    causal) -> (layout, bias)``, against scores recomputed here block by block in float64.

    Each query block keeps its diagonal block plus exactly min(top_k, candidates) other blocks, the
    candidates being the earlier blocks (causal) or all other blocks; no kept candidate scores below
    a dropped one (ties may go either way: a 1e-4 relative slack covers float32 rounding); a causal
    row never keeps a later block; the straight-through bias is zero in value. The router's documented
    pooling: keys by their block's mean, queries by the block's first token (causal) or mean.
    """
    del v  # the router sees queries and keys only
    layout, bias = route(q, k, w_query, w_key, block_size, top_k, causal)
    B, nh, T, _ = q.shape
    n = math.ceil(T / block_size)
    assert layout.dtype == torch.bool and layout.shape == (B, nh, n, n), (
        f"the layout must be bool ({B}, {nh}, {n}, {n}), got {layout.dtype} {tuple(layout.shape)}")
    assert bias.shape == (B, nh, n, n) and not bias.detach().any(), "the straight-through bias must be 0 in value"
    wq, wk = w_query.double(), w_key.double()
    scale = math.sqrt(w_query.shape[1])
    for b in range(B):
        for h in range(nh):
            blocks_q = [q[b, h, i * block_size:(i + 1) * block_size].double() for i in range(n)]
            keys = [k[b, h, j * block_size:(j + 1) * block_size].double().mean(0) @ wk for j in range(n)]
            for i in range(n):
                row = layout[b, h, i]
                assert row[i], f"query block {i} (batch {b}, head {h}) drops its own block"
                kept = [j for j in range(n) if row[j] and j != i]
                if causal:
                    future = [j for j in kept if j > i]
                    assert not future, f"causal query block {i} keeps later blocks {future}"
                candidates = [j for j in range(n) if (j < i if causal else j != i)]
                assert len(kept) == min(top_k, len(candidates)), (
                    f"query block {i} keeps {len(kept)} other blocks, expected min(top_k={top_k}, "
                    f"{len(candidates)} candidates)")
                pooled = blocks_q[i][0] if causal else blocks_q[i].mean(0)
                score = {j: float((pooled @ wq) @ keys[j]) / scale for j in candidates}
                dropped = [j for j in candidates if j not in kept]
                if kept and dropped:
                    worst_kept, best_dropped = min(score[j] for j in kept), max(score[j] for j in dropped)
                    slack = 1e-4 * (1 + abs(best_dropped))
                    assert worst_kept >= best_dropped - slack, (
                        f"query block {i} keeps a block scoring {worst_kept:.4g} but drops one scoring "
                        f"{best_dropped:.4g}: not the top {top_k}")
