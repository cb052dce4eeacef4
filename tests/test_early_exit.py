"""Unit tests of project 27: the full-model path is P8's cached greedy, exit heads start as ln_f + the
LM head, the confidence measures, a skipped layer's K/V, the batched K/V fill, teacher forcing, the
self-distillation wrapper on the shared loop, and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from impl.distillation.fast import kd_loss
from impl.early_exit import fast, naive
from impl.early_exit.heads import ExitHeads, confidence, layer_kv
from impl.early_exit.train import ExitDistiller, _cache_key, head_agreement, train_heads
from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache.fast import KVCache
from impl.kv_cache.fast import generate as cached_generate
from tests.cases.early_exit import exit_case

TOKENS = np.random.default_rng(0).integers(0, 32, 3000).astype(np.uint16)


def tiny(seed: int = 0, n_layer: int = 4, rank: int = 4) -> tuple[GPT, ExitHeads]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=32, block_size=48, n_layer=n_layer, n_head=2, n_embd=16)).float().eval()
    return model, ExitHeads.for_model(model, rank).eval()


def test_full_model_path_is_p8s_cached_greedy():
    model, _ = tiny()
    prompt = torch.randint(32, (1, 5), generator=torch.Generator().manual_seed(1))
    tokens, logits = naive.full_generate(model, prompt, 20)
    assert torch.equal(tokens, cached_generate(model, prompt, 20))
    assert logits.shape == (20, 32)
    assert torch.equal(logits[0], model(prompt)[0, -1])


def test_untrained_head_is_ln_f_and_the_tied_lm_head_and_the_last_layer_is_the_models_head():
    model, heads = tiny(rank=8)
    h = torch.randn(2, 3, 16)
    assert torch.allclose(heads.logits(2, h, model), model.head(h))  # LayerNorm copied from ln_f, adapter at 0
    assert torch.equal(heads.logits(4, h, model), model.head(h))
    assert sum(p.numel() for p in heads.parameters()) == 3 * (2 * 16 + 16 * 8 + 8 + 8 * 16 + 16)


def test_confidence_measures_are_0_for_uniform_and_1_for_certain():
    uniform, certain = torch.zeros(10), torch.tensor([0.0] * 9 + [1e4])
    assert confidence(uniform, "max_prob").item() == pytest.approx(0.1)
    assert confidence(uniform, "margin").item() == pytest.approx(0.0, abs=1e-7)
    assert confidence(uniform, "entropy").item() == pytest.approx(0.0, abs=1e-6)
    for measure in ("max_prob", "margin", "entropy"):
        assert confidence(certain, measure).item() == pytest.approx(1.0, abs=1e-6)
    two = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    assert confidence(two, "margin").item() == pytest.approx(0.3, abs=1e-6)
    assert confidence(two, "entropy").item() == pytest.approx(
        1 + (0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)) / math.log(3), abs=1e-6)
    with pytest.raises(ValueError, match="known"):
        confidence(uniform, "patience")


def test_layer_kv_is_what_the_blocks_attention_stores_in_the_cache():
    model, _ = tiny()
    x = torch.randn(1, 5, 16)
    cache = KVCache.for_model(model, 1, 5)
    with torch.no_grad():
        model.blocks[2](x, cache)
        k, v = layer_kv(model.blocks[2], x)
    assert torch.equal(cache.k[2], k) and torch.equal(cache.v[2], v)


def test_batched_fill_writes_every_skipped_layer_like_one_layer_kv_each_and_nothing_else():
    model, _ = tiny(n_layer=5)
    with torch.no_grad():
        for block in model.blocks:  # non-trivial LayerNorm affines: a shared one would show
            block.ln_1.weight.uniform_(0.5, 2.0)
            block.ln_1.bias.normal_()
            block.attn.c_attn.bias.normal_()
        h = torch.randn(1, 1, 16)
        cache = KVCache.for_model(model, 1, 4)
        cache.position = 2
        fast.SkippedKV(model).fill(cache, 2, h)
        for layer in range(5):
            if layer < 2:
                assert not cache.k[layer].any() and not cache.v[layer].any()
                continue
            k, v = layer_kv(model.blocks[layer], h)
            assert torch.allclose(cache.k[layer, :, :, 2:3], k, atol=1e-6)
            assert torch.allclose(cache.v[layer, :, :, 2:3], v, atol=1e-6)
        assert not cache.k[:, :, :, [0, 1, 3]].any()


def test_threshold_0_exits_every_token_at_the_first_layer_checked():
    model, heads = tiny(n_layer=6)
    prompt = torch.randint(32, (1, 4), generator=torch.Generator().manual_seed(2))
    assert naive.generate(model, heads, prompt, 10, 0.0).exit_layers.tolist() == [6] + [1] * 9
    assert fast.generate(model, heads, prompt, 10, 0.0, check_every=2).exit_layers.tolist() == [6] + [2] * 9
    assert fast.generate(model, heads, prompt, 10, 0.0, check_every=4).exit_layers.tolist() == [6] + [4] * 9
    assert fast.generate(model, heads, prompt, 10, 0.0, check_every=6).exit_layers.tolist() == [6] * 10


def test_fast_with_every_layer_checked_exits_where_naive_does():
    case = {k: v for k, v in exit_case(5, 5, 2, 8, 4, 24, quantile=0.5).items() if k != "id"}
    a, b = naive.trace(**case), fast.trace(**case)
    assert (a.exit_layers < 5).any() and (a.exit_layers[1:] == 5).any(), "the case should mix exits and full runs"
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layers, b.exit_layers)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_teacher_forcing_at_a_threshold_above_1_scores_like_the_full_model():
    model, heads = tiny()
    ids = torch.randint(32, (1, 30), generator=torch.Generator().manual_seed(3))
    out = fast.generate(model, heads, ids[:, :10], 20, 1.5, forced=ids[:, 10:])
    assert torch.equal(out.tokens, ids)
    assert torch.allclose(out.logits, model(ids)[0, 9:29], atol=1e-5)


def test_generation_refuses_a_batch_and_a_bad_check_every():
    model, heads = tiny()
    with pytest.raises(ValueError, match="batch 1"):
        naive.generate(model, heads, torch.zeros(2, 3, dtype=torch.long), 4, 0.5)
    with pytest.raises(ValueError, match="check_every"):
        fast.generate(model, heads, torch.zeros(1, 3, dtype=torch.long), 4, 0.5, check_every=0)


def test_self_distillation_trains_only_the_heads_and_moves_them_towards_the_final_layer():
    model, _ = tiny(n_layer=3)
    body = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.from_numpy(TOKENS[:4 * 16].astype(np.int64)).view(4, 16)
    untrained = ExitHeads.for_model(model, 4)
    heads, losses = train_heads(model, TOKENS, TOKENS, rank=4, temperature=1.0, steps=30, batch_size=4,
                                block_size=16, learning_rate=1e-2, warmup_iters=2)
    assert all(torch.equal(v, body[k]) for k, v in model.state_dict().items()), "the body changed"

    def mean_kd(h: ExitHeads) -> float:
        with torch.no_grad():
            states = model.hidden_states(x)
            final = model.head(states[-1])
            return sum(kd_loss(h.logits(layer, states[layer], model), final, 1.0).item() for layer in (1, 2)) / 2

    assert mean_kd(heads) < 0.8 * mean_kd(untrained)
    assert len(losses) >= 2
    assert len(head_agreement(model, heads, TOKENS[:200], block_size=16)) == 2


def test_distiller_aux_loss_is_the_mean_kd_of_the_heads_and_none_in_evaluation():
    model, heads = tiny(n_layer=3)
    wrapper = ExitDistiller(model, heads)
    x = torch.from_numpy(TOKENS[:32].astype(np.int64)).view(2, 16)
    final = wrapper(x)
    states = model.hidden_states(x)
    want = (kd_loss(heads.logits(1, states[1], model), final, 1.0) +
            kd_loss(heads.logits(2, states[2], model), final, 1.0)) / 2
    assert torch.allclose(wrapper.aux_loss(), want)
    assert not final.requires_grad and wrapper.aux_loss().requires_grad
    assert [n for n, _ in wrapper.named_parameters()] == [n for n, _ in wrapper.named_parameters()
                                                          if n.startswith("heads.")]
    with torch.no_grad():
        wrapper(x)
    assert wrapper.aux_loss() is None


def test_heads_cache_key_depends_on_the_recipe():
    from impl.early_exit import train as train_module

    full = _cache_key("full")
    assert full != _cache_key("quick")
    recipe = dict(train_module.RECIPES["full"])
    train_module.RECIPES["full"]["steps"] += 1
    try:
        assert _cache_key("full") != full
    finally:
        train_module.RECIPES["full"] = recipe


def test_workload_picks_the_loosest_threshold_with_agreement_at_least_0_9_or_never_exits(monkeypatch):
    from benchmarks.workloads import early_exit as workload

    agreement = dict(zip(workload.THRESHOLDS, [1.0, 0.99, 0.97, 0.95, 0.93, 0.9, 0.91, 0.89, 0.95, 0.8, 0.7, 0.6, 0.5],
                         strict=True))
    monkeypatch.setattr(workload, "full_generate", lambda model, p, n: p)
    monkeypatch.setattr(workload, "_runs", lambda *a, **k: {"agreement": agreement[a[4]]})
    assert workload.choose_threshold(None, None, [torch.zeros(1, 2)], 4, None)[0] == 0.3  # not the first to fail
    agreement = {t: 0.5 for t in workload.THRESHOLDS}
    assert workload.choose_threshold(None, None, [torch.zeros(1, 2)], 4, None)[0] == workload.NEVER
