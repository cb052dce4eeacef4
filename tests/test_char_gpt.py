"""Unit tests of project 1: the recipe is nanoGPT's, the whole-split loss, seeds, devices, and the
multi-seed loss claim's arithmetic. The spec's checks run in tests/test_specs.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import benchmarks.workloads.char_gpt as workload
from harness.measure import Context
from impl.char_gpt.train import CharData, recipe, train_char_gpt
from impl.data.tokens import CharTokenizer
from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.train.evaluate import full_split_loss
from impl.train.loop import TrainConfig, lr_at, make_optimizer

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 60


def tiny_data() -> CharData:
    tok = CharTokenizer.from_text(TEXT)
    ids = np.array(tok.encode(TEXT), dtype=np.uint16)
    n = int(len(ids) * 0.9)
    return CharData(tok, ids[:n], ids[n:], TEXT[:n])


def tiny_recipe(vocab_size: int, seed: int = 1337) -> tuple[GPTConfig, TrainConfig]:
    model_cfg = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)
    train_cfg = TrainConfig(max_iters=6, lr_decay_iters=6, warmup_iters=2, batch_size=4, block_size=16,
                            eval_interval=3, eval_iters=2, seed=seed)
    return model_cfg, train_cfg


def test_recipe_is_nanogpts_shakespeare_char_cpu_recipe():
    model_cfg, train_cfg = recipe(65)
    assert (model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd, model_cfg.block_size) == (4, 4, 128, 64)
    assert model_cfg.bias is False and model_cfg.dropout == 0.0  # nanoGPT's train.py: bias=False
    assert (train_cfg.max_iters, train_cfg.lr_decay_iters, train_cfg.batch_size, train_cfg.block_size) == (
        2000, 2000, 12, 64)
    assert (train_cfg.learning_rate, train_cfg.min_lr, train_cfg.warmup_iters) == (1e-3, 1e-4, 100)
    assert (train_cfg.beta1, train_cfg.beta2, train_cfg.weight_decay, train_cfg.grad_clip) == (0.9, 0.99, 0.1, 1.0)
    assert (train_cfg.eval_interval, train_cfg.eval_iters, train_cfg.grad_accum_steps) == (250, 20, 1)
    assert train_cfg.seed == 1337 and recipe(65, seed=2)[1].seed == 2


def test_recipe_model_has_no_biases_and_nanogpts_parameter_count():
    model = GPT(recipe(65)[0])
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    per_block = 12 * 128 * 128 + 2 * 128  # attention 4 C^2, MLP 8 C^2, two layer-norm weights
    assert model.num_params() == 4 * per_block + 65 * 128 + 64 * 128 + 128 == 804_096  # tied head once
    assert model.num_params(non_embedding=True) == 795_904  # what nanoGPT prints: "0.80M"


def test_weight_decay_falls_on_every_2d_weight_and_on_nothing_else():
    model = GPT(recipe(65)[0])
    decay, no_decay = make_optimizer(model, recipe(65)[1]).param_groups
    names = {id(p): n for n, p in model.named_parameters()}  # the tied head appears once, as wte
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters() if "ln_" in n}
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_learning_rate_follows_nanogpts_warmup_and_cosine_decay():
    cfg = recipe(65)[1]
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 101)  # warm-up: lr * (it + 1) / (warmup + 1)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way down the cosine
    assert lr_at(2000, cfg) == pytest.approx(1e-4) and lr_at(2001, cfg) == 1e-4
    decay = [lr_at(it, cfg) for it in range(100, 2001)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_whole_split_loss_is_the_mean_over_every_full_window():
    data = tiny_data()
    torch.manual_seed(0)
    model = GPT(tiny_recipe(data.tokenizer.vocab_size)[0]).eval()
    block = model.config.block_size
    ids = data.val[: 5 * block + 7]  # 5 full windows and a partial one, which is left out
    x = torch.from_numpy(ids[: 5 * block].astype(np.int64)).view(5, block)
    y = torch.from_numpy(ids[1 : 5 * block + 1].astype(np.int64)).view(5, block)
    with torch.no_grad():
        expected = lm_loss(model(x), y).item()
    assert full_split_loss(model, ids, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert full_split_loss(model, ids, batch_size=64) == pytest.approx(expected, rel=1e-6)


def test_same_seed_trains_the_same_model_and_another_seed_another():
    data = tiny_data()
    train = lambda seed: train_char_gpt(data, *tiny_recipe(data.tokenizer.vocab_size, seed), progress=False)  # noqa: E731
    (a, ra), (b, rb), (c, _) = train(1337), train(1337), train(1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert ra.final_val_loss == rb.final_val_loss
    assert not torch.equal(a.wte.weight, c.wte.weight)


def test_loss_claim_judges_the_mean_over_seeds_with_their_min_and_max(monkeypatch):
    monkeypatch.setattr(workload, "recipe", tiny_recipe)
    monkeypatch.setattr(workload, "_data", tiny_data)
    workload._trained.cache_clear()
    try:
        full = workload.recipe_val_loss(Context(quick=False, device="cpu"))
        quick = workload.recipe_val_loss(Context(quick=True, device="cpu"))
    finally:
        workload._trained.cache_clear()
    per_seed = [full.details["per_seed"][str(s)]["val_loss_whole_split"] for s in workload.SEEDS_FULL]
    assert len(set(per_seed)) == 3, "three seeds must give three different models"
    assert full.value == pytest.approx(sum(per_seed) / 3) and full.spread == (min(per_seed), max(per_seed))
    assert quick.details["seeds"] == [1337] and quick.value == per_seed[0]
    assert len(full.plots[0].series) == 6 and all(not math.isnan(v) for s in full.plots[0].series.values() for v in s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_and_evaluation_run_on_the_device_asked_for():
    data = tiny_data()
    model, result = train_char_gpt(data, *tiny_recipe(data.tokenizer.vocab_size), progress=False, device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert math.isfinite(full_split_loss(model, data.val)) and math.isfinite(result.final_val_loss)
