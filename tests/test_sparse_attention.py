"""Unit tests of project 20 beyond the spec's checks: masks, buckets and chunks of the block-sparse
path, gradients, the GPT backend, the learned router, and the claims' exponent fit."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads.sparse_attention import growth_exponent
from impl.gpt.attention import get_attention, register_attention
from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.sparse_attention import fast, learned, naive, sparse_window_attention
from impl.sparse_attention.patterns import (
    bigbird_layout,
    check_layout,
    expand_layout,
    fixed_layout,
    num_blocks,
    window_layout,
)


def _qkv(B: int, nh: int, T: int, hs: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, T, hs, generator=gen, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [16, 21])
def test_expanded_mask_keeps_exactly_the_kept_blocks(causal, T):
    layout = bigbird_layout(num_blocks(T, 4), window=1, n_global=1, n_random=1, seed=3, causal=causal)
    mask = expand_layout(layout, 4, T, causal)
    t, s = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
    expected = layout[t // 4, s // 4] & ((s <= t) if causal else True)
    assert torch.equal(mask, expected)


def test_layout_without_its_diagonal_is_rejected_with_a_sentence():
    layout = window_layout(4, 1)
    layout[2, 2] = False
    with pytest.raises(ValueError, match="diagonal"):
        fast.sparse_attention(*_qkv(1, 1, 16, 4), layout, 4, False)
    with pytest.raises(ValueError, match="ending in"):
        check_layout(window_layout(3, 1), 4)


def test_global_rows_get_their_own_bucket_so_narrow_rows_stay_narrow():
    layout = window_layout(32, window=1, n_global=2)  # rows 0, 1 see all 32 blocks, others 5
    buckets = fast.row_buckets(layout.sum(-1))
    assert [b.tolist() for b in buckets] == [list(range(2, 32)), [0, 1]]
    assert len(fast.row_buckets(window_layout(32, window=1, causal=True).sum(-1))) == 1


def test_chunked_rows_give_the_dense_masked_result(monkeypatch):
    monkeypatch.setattr(fast, "SLAB_ELEMENTS", 1)  # one query-block row per chunk
    q, k, v = _qkv(2, 2, 45, 8)
    layout = fixed_layout(num_blocks(45, 4), stride=3, causal=True)
    torch.testing.assert_close(fast.sparse_attention(q, k, v, layout, 4, True),
                               naive.sparse_attention(q, k, v, layout, 4, True))


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_gradients_match_dense_masked(causal):
    q, k, v = _qkv(1, 2, 30, 8)
    layout = window_layout(num_blocks(30, 4), window=1, n_global=1, causal=causal)
    dy = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    grads = []
    for attend in (naive.sparse_attention, fast.sparse_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        attend(*leaves, layout, 4, causal).backward(dy)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_sparse_window_backend_equals_dense_when_the_window_covers_everything():
    import impl.sparse_attention  # noqa: F401  (registers "sparse_window")

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32, attention="naive")).eval()
    covered = torch.randint(65, (2, 48))  # 3 blocks of 16: window 2 + global block 0 see all of them
    longer = torch.randint(65, (2, 80))  # block 4 no longer sees block 1
    with torch.no_grad():
        dense = [model(covered), model(longer)]
        model.set_attention("sparse_window")
        sparse = [model(covered), model(longer)]
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[1][:, :48], dense[1][:, :48], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse[1][:, 64:], dense[1][:, 64:], atol=1e-4)


def test_backend_queries_after_a_cache_match_the_full_sequence():
    attend = get_attention("sparse_window")
    q, k, v = _qkv(1, 2, 70, 8)
    full = attend(q, k, v, True)
    torch.testing.assert_close(attend(q[:, :, -5:], k, v, True), full[:, :, -5:])
    torch.testing.assert_close(attend(q[:, :, -1:], k, v, True), full[:, :, -1:])


def test_factory_window_and_globals_decide_what_a_query_sees():
    register_attention("sparse_window_test", sparse_window_attention(block_size=8, window=1, n_global=1))
    attend = get_attention("sparse_window_test")
    q, k, v = _qkv(1, 1, 64, 4)
    y = attend(q, k, v, True)
    # the last query block (7) sees blocks 0 (global), 6 and 7; blocks 1..5 are invisible to it
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:48] += 5.0
    v2[:, :, 8:48] -= 3.0
    torch.testing.assert_close(attend(q, k2, v2, True)[:, :, 56:], y[:, :, 56:])
    k2[:, :, :8] += 1.0  # the global block is visible to every query
    assert not torch.allclose(attend(q, k2, v2, True)[:, :, 56:], y[:, :, 56:])


def test_learned_forward_is_plain_sparse_attention_over_its_layout():
    q, k, v = _qkv(2, 2, 40, 8)
    w_query, w_key = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    layout, bias = learned.route_blocks(q, k, w_query, w_key, 8, 2, True)
    assert layout.shape == (2, 2, 5, 5) and layout.diagonal(dim1=-2, dim2=-1).all()
    assert (layout.sum(-1) <= 3).all() and not bias.any()
    torch.testing.assert_close(learned.learned_attention_fast(q, k, v, w_query, w_key, 8, 2, True),
                               naive.sparse_attention(q, k, v, layout, 8, True))


def test_learned_causal_output_ignores_future_tokens():
    module = learned.LearnedSparseAttention(head_size=8, block_size=4, top_k=2).double()
    q, k, v = _qkv(1, 2, 32, 8)
    y = module(q, k, v, True)
    for t in (5, 13, 30):  # perturb everything after t: outputs up to t must not move
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:])
        torch.testing.assert_close(module(q2, k2, v2, True)[:, :, : t + 1], y[:, :, : t + 1])


def test_router_receives_gradient_through_kept_blocks():
    module = learned.LearnedSparseAttention(head_size=8, block_size=4, top_k=2)
    q, k, v = _qkv(2, 2, 32, 8, dtype=torch.float32)
    module(q, k, v, True).square().sum().backward()
    for p in (module.w_query, module.w_key):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_learned_pattern_plugs_into_gpt_as_a_trainable_attention():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    for block in model.blocks:  # an nn.Module in the attend slot: its router trains with the model
        block.attn.attend = learned.LearnedSparseAttention(head_size=16, block_size=8, top_k=2)
    idx = torch.randint(65, (2, 64))
    lm_loss(model(idx[:, :-1]), idx[:, 1:]).backward()
    assert sum(1 for name, _ in model.named_parameters() if "attend.w_" in name) == 4
    assert all(block.attn.attend.w_query.grad.abs().sum() > 0 for block in model.blocks)


def _needle_batch(gen: torch.Generator, B: int, n: int = 8, b: int = 4, hs: int = 8):
    """One key block per sequence carries a marker (key feature 0) and the answer (its values);
    queries carry a constant feature 1 the router can learn to match with the marker."""
    q, k, v = (torch.randn(B, 1, n * b, hs, generator=gen) for _ in range(3))
    q[..., 1] = 1.0
    needle = torch.randint(n, (B,), generator=gen)
    for e, j in enumerate(needle.tolist()):
        k[e, :, j * b:(j + 1) * b, 0] += 3.0
        v[e, :, j * b:(j + 1) * b] += 2.0
    target = torch.stack([v[e, :, j * b:(j + 1) * b].mean(1) for e, j in enumerate(needle.tolist())])
    return q, k, v, needle, target.unsqueeze(2)  # target (B, 1, 1, hs)


def _needle_hit_rate(module: learned.LearnedSparseAttention) -> float:
    q, k, v, needle, _ = _needle_batch(torch.Generator().manual_seed(99), B=64)
    layout, _ = learned.route_blocks(q, k, module.w_query, module.w_key, 4, 1, False)  # (64, 1, 8, 8)
    return layout[torch.arange(64), 0, :, needle].float().mean().item()


def test_router_learns_to_pick_the_informative_block():
    torch.manual_seed(0)
    module = learned.LearnedSparseAttention(head_size=8, block_size=4, top_k=1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = _needle_hit_rate(module)
    opt = torch.optim.Adam(module.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        q, k, v, _, target = _needle_batch(gen, B=16)
        loss = (module(q, k, v, False) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _needle_hit_rate(module)
    assert after > 0.8 and after > before + 0.2, f"hit rate {before:.2f} -> {after:.2f}"


def test_growth_exponent_recovers_known_powers():
    n = [1024, 2048, 4096, 8192]
    assert growth_exponent(n, [3.0 * x for x in n]) == pytest.approx(1.0)
    assert growth_exponent(n, [x**1.5 for x in n]) == pytest.approx(1.5)
    assert growth_exponent(n, [0.5 * x * x for x in n]) == pytest.approx(2.0)
