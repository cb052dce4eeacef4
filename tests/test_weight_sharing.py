"""Unit tests of project 19: tying, cross-layer sharing, factorized embeddings, counts. The spec's checks
(counts vs HF, tied gradients, shared-layer KV cache) run in tests/test_specs.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.kv_cache import fast as kv_fast
from impl.kv_cache import naive as kv_naive
from impl.train.loop import TrainConfig, make_optimizer, train
from impl.weight_sharing import (
    counted_params,
    factorize_embeddings,
    layer_groups,
    param_count,
    share_layers,
    sharing_groups,
    untie,
)


def tiny_gpt(seed: int = 0, n_layer: int = 4, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=n_layer, n_head=2, n_embd=16, **overrides))


def test_gpt2_small_counts_are_the_issues_figures():
    shape = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    assert param_count(**shape) == counted_params(**shape) == 124_439_808
    assert param_count(**shape, tied=False) == counted_params(**shape, tied=False) == 163_037_184
    assert round(1 - 124_439_808 / 163_037_184, 3) == 0.237


def test_tied_head_and_embedding_are_one_tensor_counted_once():
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    tied = model.num_params()
    untie(model)
    assert model.lm_head.weight is not model.wte.weight
    assert torch.equal(model.lm_head.weight, model.wte.weight)
    assert model.num_params() == tied + 40 * 16


def test_layer_groups_are_contiguous_and_cover_every_layer():
    assert layer_groups(4, 1) == [[0, 1, 2, 3]]
    assert layer_groups(6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert layer_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert layer_groups(3, 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="n_groups"):
        layer_groups(3, 4)


def test_share_layers_aliases_parameters_but_keeps_each_block_and_its_cache_slot():
    model = share_layers(tiny_gpt(), [[0, 2], [1, 3]])
    assert len({id(b) for b in model.blocks}) == 4
    assert [b.attn.layer for b in model.blocks] == [0, 1, 2, 3]
    for a, b in ((0, 2), (1, 3)):
        for (name, p), (_, q) in zip(model.blocks[a].named_parameters(), model.blocks[b].named_parameters(),
                                     strict=True):
            assert p is q, name
    assert model.blocks[0].attn.c_attn.weight is not model.blocks[1].attn.c_attn.weight
    assert sharing_groups(model) == [[0, 2], [1, 3]]
    assert model.num_params() == param_count(40, 32, 4, 2, 16, layer_groups=[[0, 2], [1, 3]])


def test_share_layers_refuses_overlapping_or_out_of_range_groups():
    with pytest.raises(ValueError, match="more than one group"):
        share_layers(tiny_gpt(), [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="out of range"):
        share_layers(tiny_gpt(), [[0, 4]])


def test_a_shared_weight_receives_the_sum_of_its_layers_gradients():
    """Sharing = one tensor used L times: its gradient is the sum of what L separate copies would get."""
    shared = share_layers(tiny_gpt(n_layer=3), [[0, 1, 2]])
    copies = tiny_gpt(n_layer=3)
    copies.load_state_dict(shared.state_dict())  # every block holds block 0's values, as its own tensors
    idx = torch.randint(40, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (shared, copies):
        lm_loss(model(idx[:, :-1]), idx[:, 1:]).backward()
    for name, p in shared.blocks[0].named_parameters():
        total = sum(dict(b.named_parameters())[name].grad for b in copies.blocks)
        torch.testing.assert_close(p.grad, total, rtol=1e-5, atol=1e-7)


def test_the_optimizer_holds_each_shared_tensor_once():
    model = share_layers(tiny_gpt(), [[0, 1, 2, 3]])
    opt = make_optimizer(model, TrainConfig())
    n = sum(p.numel() for group in opt.param_groups for p in group["params"])
    assert n == model.num_params() == param_count(40, 32, 4, 2, 16, layer_groups=[[0, 1, 2, 3]])


def test_training_keeps_shared_layers_shared_and_lowers_the_loss():
    model = share_layers(tiny_gpt(), [[0, 1, 2, 3]])
    tokens = np.tile(np.arange(40, dtype=np.uint16), 30)
    cfg = TrainConfig(max_iters=15, lr_decay_iters=15, warmup_iters=1, batch_size=4, block_size=16,
                      eval_interval=10**6, eval_iters=2, learning_rate=3e-3)
    result = train(model, tokens, tokens, cfg, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert sharing_groups(model) == [[0, 1, 2, 3]]


def test_factorized_embedding_is_tied_counted_by_the_closed_form_and_generates_alike_with_a_cache():
    model = factorize_embeddings(tiny_gpt(), 4).eval()
    assert model.lm_head.weight is model.wte.table.weight
    assert model.lm_head.proj_weight is model.wte.proj.weight
    assert model.num_params() == param_count(40, 32, 4, 2, 16, embed_dim=4)
    prompt = torch.randint(40, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(kv_naive.generate(model, prompt, 12), kv_fast.generate(model, prompt, 12))


def test_factorized_head_gradient_reaches_both_factors_from_both_uses():
    model = factorize_embeddings(tiny_gpt(), 4)
    idx = torch.randint(40, (1, 8), generator=torch.Generator().manual_seed(2))
    lm_loss(model(idx[:, :-1]), idx[:, 1:]).backward()
    unread = torch.ones(40, dtype=torch.bool)
    unread[idx[0, :-1]] = False
    # rows never looked up still get gradient: through the head, which scores every row
    assert model.wte.table.weight.grad[unread].abs().sum() > 0
    assert model.wte.proj.weight.grad.abs().sum() > 0


def test_factorize_refuses_an_untied_model_and_a_wider_inner_size():
    with pytest.raises(ValueError, match="tied"):
        factorize_embeddings(tiny_gpt(tie_embeddings=False), 4)
    with pytest.raises(ValueError, match="embed_dim"):
        factorize_embeddings(tiny_gpt(), 17)
