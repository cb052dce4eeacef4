"""Unit tests of project 17: structured pruning really shrinks the matrices, importance ranks what a
layer's output depends on, Wanda's model pass, masked fine-tuning, the iterative schedule."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from impl.gpt.model import GPT, GPTConfig
from impl.pruning import fast, naive, structured
from impl.pruning.unstructured import (
    cubic_schedule,
    finetune_masked,
    iterative_prune,
    magnitude_model_masks,
    model_masks,
    sparsity_of,
    wanda_model_masks,
)
from impl.train.loop import TrainConfig

TOKENS = np.random.default_rng(0).integers(0, 32, 3000).astype(np.uint16)


def tiny_gpt(seed: int = 0, n_head: int = 4) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=n_head, n_embd=32)).float().eval()


def tiny_cfg(steps: int = 3) -> TrainConfig:
    return TrainConfig(max_iters=steps, lr_decay_iters=steps, warmup_iters=1, batch_size=4, block_size=16,
                       eval_interval=10**6, eval_iters=1, learning_rate=3e-3)


def calib(n: int = 4) -> torch.Tensor:
    return torch.from_numpy(TOKENS[: n * 16].astype(np.int64)).view(n, 16)


def test_prune_count_rounds_half_to_even_and_refuses_a_sparsity_outside_0_1():
    assert [naive.prune_count(10, s) for s in (0.25, 0.35, 0.5, 1.0)] == [2, 4, 5, 10]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        naive.prune_count(10, 1.5)


def test_structured_pruning_shrinks_every_matrix_and_counts_exactly_the_removed_parameters():
    model = tiny_gpt()
    before = model.num_params()
    keep = {"heads": [[0, 2, 3], [1]], "neurons": [list(range(0, 128, 2)), [5, 6, 7]]}
    structured.shrink(model, keep)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    assert a0.c_attn.weight.shape == (3 * 3 * 8, 32) and a0.c_proj.weight.shape == (32, 24) and a0.n_head == 3
    assert a1.c_attn.weight.shape == (3 * 8, 32) and a1.n_head == 1
    assert model.blocks[0].mlp.c_fc.weight.shape == (64, 32) and model.blocks[1].mlp.c_proj.weight.shape == (32, 3)
    removed_heads = 1 + 3  # each head: 3 * 8 rows of c_attn (weight + bias) and 8 columns of c_proj
    removed_neurons = 64 + 125  # each neuron: a c_fc row + bias entry and a c_proj column
    expected = removed_heads * (3 * 8 * 32 + 3 * 8 + 8 * 32) + removed_neurons * (32 + 1 + 32)
    assert before - model.num_params() == expected
    model(calib(2))  # still runs


def test_importance_ranks_a_head_and_a_neuron_whose_output_is_zeroed_last():
    model = tiny_gpt(1)
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight[:, 8:16] = 0  # head 1 of layer 0 adds nothing to the residual
        model.blocks[1].mlp.c_proj.weight[:, 7] = 0  # neuron 7 of layer 1 neither
    imp = structured.importance(model, calib())
    assert imp["heads"][0][1] == 0 and (imp["heads"][0][[0, 2, 3]] > 0).all()
    assert imp["neurons"][1][7] == 0
    assert 1 not in structured.keep_most_important(imp["heads"][0], 0.25)
    assert structured.keep_most_important(torch.tensor([3.0, 1.0, 2.0, 5.0]), 0.5) == [0, 3]


def test_head_importance_is_the_energy_the_head_adds_to_the_residual():
    model = tiny_gpt(2)
    ids = calib(2)
    seen = []
    h = model.blocks[0].attn.c_proj.register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach()))
    model(ids)
    h.remove()
    y = seen[0].reshape(-1, 32).double()
    w = model.blocks[0].attn.c_proj.weight.double()
    by_hand = [((y[:, h * 8:(h + 1) * 8] @ w[:, h * 8:(h + 1) * 8].T) ** 2).sum() for h in range(4)]
    imp = structured.importance(model, ids)["heads"][0]
    assert torch.allclose(imp, torch.stack(by_hand), rtol=1e-9)


def test_wanda_model_masks_score_the_first_block_on_the_embeddings_and_prune_each_row_equally():
    model = tiny_gpt(3)
    ids = calib()
    masks = wanda_model_masks(model, ids, 0.5)
    x = model.blocks[0].ln_1(model.embed(ids, torch.arange(16)))  # c_attn's input
    _, expected = fast.wanda_mask(model.blocks[0].attn.c_attn.weight, fast.input_norms(x), 0.5)
    assert torch.equal(masks["blocks.0.attn.c_attn"], expected)
    for m in masks.values():
        assert ((~m).sum(dim=1) == m.shape[1] // 2).all()
    assert model.blocks[0].attn.c_attn.weight.count_nonzero() == model.blocks[0].attn.c_attn.weight.numel()


def test_global_magnitude_prunes_unequal_layers_but_the_requested_total():
    model = tiny_gpt(4)
    with torch.no_grad():
        model.blocks[1].mlp.c_fc.weight.mul_(100)  # one layer much larger: global pruning spares it
    masks = magnitude_model_masks(model, 0.6, "global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    assert (~masks["blocks.1.mlp.c_fc"]).float().mean() < 0.1 < (~masks["blocks.0.mlp.c_fc"]).float().mean()


def test_finetune_masked_leaves_plain_linears_and_the_exact_sparsity():
    model = tiny_gpt(5).train()
    masks = magnitude_model_masks(model, 0.5)
    finetune_masked(model, masks, TOKENS, TOKENS, tiny_cfg())
    assert type(model.blocks[0].attn.c_attn) is torch.nn.Linear
    assert "parametrizations" not in dict(model.named_modules())["blocks.0.attn.c_attn"]._modules
    assert sparsity_of(model) == pytest.approx(0.5, abs=1e-3)


def test_cubic_schedule_ends_at_the_final_sparsity_and_prunes_most_early():
    steps = cubic_schedule(0.7, 3)
    assert steps[-1] == pytest.approx(0.7) and steps[0] > steps[1] - steps[0] > steps[2] - steps[1] > 0


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_iterative_pruning_reaches_the_final_sparsity_and_keeps_earlier_pruned_weights_pruned(method):
    model = tiny_gpt(6).train()
    first = model_masks(copy.deepcopy(model), method, cubic_schedule(0.8, 3)[0], calib())
    iterative_prune(model, method, 0.8, 3, TOKENS, TOKENS, tiny_cfg(2), calib())
    for name in first:
        w = model.get_submodule(name).weight
        if method == "wanda":  # every row prunes round(0.8 * in) of its weights
            assert ((w == 0).sum(dim=1) == round(0.8 * w.shape[1])).all(), name
        else:
            assert int((w == 0).sum()) == round(0.8 * w.numel()), name
    for name, keep in first.items():
        assert not model.get_submodule(name).weight[~keep].any(), f"{name}: a weight pruned at step 1 came back"


def test_unknown_method_or_scope_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pruning method"):
        model_masks(tiny_gpt(), "random", 0.5)
    with pytest.raises(ValueError, match="wanda needs calib_batches"):
        model_masks(tiny_gpt(), "wanda", 0.5)
    with pytest.raises(ValueError, match="scope"):
        fast.magnitude_masks([torch.ones(2)], 0.5, "row")
