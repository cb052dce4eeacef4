"""Unit tests of project 14 beyond the spec's checks: the model-level GPTQ pass, calibration sets, and
the one place GPTQ is known to lose to round-to-nearest."""

from __future__ import annotations

import numpy as np
import torch

from impl.gpt.model import GPT
from impl.ptq import modules
from impl.ptq.calibration import calibration_batches
from impl.ptq.fast import gptq_fast
from impl.ptq.gptq import gptq_model, hessian, reconstruction_error
from impl.ptq.quant import Scheme, dequantize, quantize_dequantize
from tests.cases.gpt import random_gpt


def _small_gpt(seed: int = 0) -> GPT:
    config, state = random_gpt(seed, n_layer=2, n_head=2, head_dim=16, vocab_size=50, block_size=32)
    return GPT.from_state(config, state)


def test_gptq_model_error_is_at_most_rtn_on_every_layer_of_a_small_gpt():
    model = _small_gpt()
    calib = torch.randint(50, (8, 32), generator=torch.Generator().manual_seed(0))
    errors: dict = {}
    codes = gptq_model(model, calib, Scheme(4, 16, False), act_order=True, lm_head=True, errors=errors)
    assert set(codes) == set(modules.linear_names(model, lm_head=True)) == set(errors)
    worse = {n: e for n, e in errors.items() if e["gptq"] > e["rtn"]}
    assert not worse, f"GPTQ worse than RTN on {worse}"


def test_gptq_model_leaves_the_model_alone_and_its_codes_load_into_quantize_model():
    model = _small_gpt(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(50, (4, 32), generator=torch.Generator().manual_seed(1))
    scheme = Scheme(4, 16, True)
    codes = gptq_model(model, calib, scheme)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    modules.quantize_model(model, scheme, weights=codes)
    layer = model.get_submodule("blocks.1.mlp.c_fc")
    assert torch.equal(layer.codes(), codes["blocks.1.mlp.c_fc"][0])
    assert torch.isfinite(model(calib)).all()


def test_gptq_model_calibrates_later_blocks_on_quantized_outputs():
    # the second block's Hessian must come from the first block's QUANTIZED outputs: with the first block
    # quantized to 2 bits its outputs change, and so must the second block's codes
    model = _small_gpt(2)
    calib = torch.randint(50, (4, 32), generator=torch.Generator().manual_seed(2))
    coarse = gptq_model(model, calib, Scheme(2, None, True), targets=("c_attn", "c_proj", "c_fc"))
    fine = gptq_model(model, calib, Scheme(2, None, True), targets=("c_attn",))
    assert torch.equal(coarse["blocks.0.attn.c_attn"][0], fine["blocks.0.attn.c_attn"][0])
    assert not torch.equal(coarse["blocks.1.attn.c_attn"][0], fine["blocks.1.attn.c_attn"][0])


def test_calibration_batches_are_seeded_windows_of_the_train_split():
    train = np.arange(1000, dtype=np.uint16)
    a, b = calibration_batches(train, 6, 20, seed=3), calibration_batches(train, 6, 20, seed=3)
    assert a.shape == (6, 20) and a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(6, 19, dtype=torch.int64))  # consecutive tokens
    assert not torch.equal(a, calibration_batches(train, 6, 20, seed=4))


def test_gptq_can_lose_to_rtn_on_a_tiny_layer():
    # a finding, pinned: GPTQ is greedy, not optimal. On a 5 x 12 layer with strongly mixed inputs
    # (condition number 1.4e4) 4-bit per-channel act-order GPTQ's error is 1.4x RTN's; the spec's
    # property is stated on layers of 32+ inputs, where no such case was found
    g = torch.Generator().manual_seed(27)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) @ mix
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    H, scheme = hessian(X), Scheme(4, None, True)
    gptq = reconstruction_error(W, dequantize(*gptq_fast(W, H, scheme, act_order=True), scheme, torch.float64), H)
    assert gptq > reconstruction_error(W, quantize_dequantize(W, scheme), H)
