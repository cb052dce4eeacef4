"""Unit tests of project 16: fake-quantized linears, QAT training with the shared loop, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from impl.gpt.model import GPT, GPTConfig
from impl.ptq.modules import QuantLinear
from impl.ptq.quant import Scheme, qparams, quantize, quantize_dequantize
from impl.qat import fast, naive
from impl.qat.train import FakeQuantLinear, convert, export_codes, fake_quant_modules, prepare_qat, qat_finetune
from impl.train.loop import TrainConfig, train


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)).float()


def tiny_cfg(steps: int = 4) -> TrainConfig:
    return TrainConfig(max_iters=steps, lr_decay_iters=steps, warmup_iters=1, batch_size=4, block_size=16,
                       eval_interval=10**6, eval_iters=1, learning_rate=3e-3)


TOKENS = np.tile(np.arange(32, dtype=np.uint16), 40)


def test_fake_quant_linear_shares_the_parameters_and_multiplies_by_the_rounded_weight():
    linear = nn.Linear(16, 8)
    scheme = Scheme(4, 8, True)
    fake = FakeQuantLinear(linear, scheme)
    assert fake.weight is linear.weight and fake.bias is linear.bias
    x = torch.randn(3, 16)
    expected = torch.nn.functional.linear(x, quantize_dequantize(linear.weight.detach(), scheme), linear.bias)
    assert torch.equal(fake(x), expected)


def test_prepare_qat_replaces_every_block_linear_and_leaves_the_tied_head_in_fp32():
    model = tiny_gpt()
    names = prepare_qat(model, Scheme(4, 8, True))
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert set(fake_quant_modules(model)) == set(names)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight


def test_scale_without_zero_is_refused():
    with pytest.raises(ValueError, match="both scale and zero"):
        fast.fake_quantize(torch.randn(2, 8), Scheme(4), scale=torch.ones(2, 1))


def test_naive_and_fast_train_to_identical_weights():
    """The two STEs are the same estimator: a few QAT steps with each give bit-identical models."""
    models = {}
    for impl in ("naive", "fast"):
        model = tiny_gpt()
        qat_finetune(model, TOKENS, TOKENS, Scheme(3, 8, False), tiny_cfg(), impl=impl)
        models[impl] = model.state_dict()
    for key, value in models["naive"].items():
        assert torch.equal(value, models["fast"][key]), key


def test_qat_moves_the_latent_weights_and_lowers_the_training_loss():
    model = tiny_gpt()
    before = copy.deepcopy(model.state_dict())
    result = qat_finetune(model, TOKENS, TOKENS, Scheme(4, 8, True), tiny_cfg(20))
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("c_fc" in k for k in moved) and any("wte" in k for k in moved)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_convert_builds_integer_layers_holding_the_trained_weights_codes():
    model = tiny_gpt()
    scheme = Scheme(4, 16, True)
    qat_finetune(model, TOKENS, TOKENS, scheme, tiny_cfg(3))
    weights = {name: m.weight.detach().clone() for name, m in fake_quant_modules(model).items()}
    codes = export_codes(model)
    idx = torch.randint(32, (2, 16))
    with torch.no_grad():
        fake_logits = model.eval()(idx)
    names = convert(model)
    assert set(names) == set(weights)
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        scale, zero = qparams(w, scheme)
        assert torch.equal(layer.codes(), quantize(w, scale, zero, scheme))
        assert torch.equal(codes[name][0], layer.codes())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), fake_logits, rtol=1e-5, atol=1e-6)


def test_convert_without_fake_quantized_layers_is_refused():
    with pytest.raises(ValueError, match="prepare_qat"):
        convert(tiny_gpt())


def test_clamped_weights_get_no_gradient_with_a_narrow_given_range():
    x = torch.tensor([[-3.0, -0.4, 0.2, 0.5, 2.5, 9.0, 0.0, 1.0]], requires_grad=True)
    scheme = Scheme(4, None, True)
    scale, zero = torch.tensor([[0.25]]), torch.zeros(1, 1)  # grid -2.0 .. 1.75
    for quantizer in (naive.fake_quantize, fast.fake_quantize):
        x.grad = None
        quantizer(x, scheme, scale, zero).sum().backward()
        assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]


def test_the_benchmark_calibrates_gptq_on_exactly_the_windows_qat_trains_on():
    from benchmarks.workloads.qat import _training_windows

    seen = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if self.training:
                seen.append(x.clone())
            return self.inner(x)

    cfg = tiny_cfg(5)
    model = Recorder(tiny_gpt())
    model.aux_loss = lambda: None
    data = np.random.default_rng(0).integers(0, 32, 2000).astype(np.uint16)
    train(model, data, data, cfg, progress=False)
    assert torch.equal(torch.cat(seen), _training_windows(data, cfg))
