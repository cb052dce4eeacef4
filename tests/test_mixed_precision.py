"""Unit tests of project 7 beyond the spec's checks: the GradScaler protocol (state, errors,
limits), the scaler inside the shared training loop, bf16 inference helpers and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.workloads.mixed_precision import saved_activation_bytes
from impl.mixed_precision import fast, naive
from impl.mixed_precision.__main__ import main
from impl.mixed_precision.fast import DynamicLossScaler
from impl.mixed_precision.inference import autocast_logits, bf16_logits, to_low_precision, weight_bytes
from impl.mixed_precision.naive import FixedLossScaler
from impl.mixed_precision.steps import Shape, build_model
from impl.mixed_precision.training import Recipe, fresh_model, train_and_evaluate
from reference.torch_amp import grad_scaler
from tests.cases.gpt import random_gpt

INF = float("inf")


def _one_step(scaler, weight: torch.nn.Parameter, optimizer: torch.optim.Optimizer, grad_value: float):
    scaler.scale((weight * grad_value).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _trajectory(scaler, grad_values: list[float]) -> list[float]:
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scales = []
    for g in grad_values:
        _one_step(scaler, weight, optimizer, g)
        scales.append(scaler.get_scale())
    return scales


@pytest.mark.parametrize("make_first", [DynamicLossScaler, grad_scaler], ids=["ours-first", "torch-first"])
def test_state_dict_moves_between_ours_and_grad_scaler_mid_run(make_first):
    values = [1.0, INF, 1.0, 1.0, 1.0, INF, 1.0, 1.0, 1.0, 1.0]
    settings = dict(init_scale=1024.0, growth_interval=3)
    straight = _trajectory(grad_scaler(**settings), values)
    first = make_first(**settings)
    head = _trajectory(first, values[:4])  # the growth tracker is mid-interval here
    second = (grad_scaler if make_first is DynamicLossScaler else DynamicLossScaler)()
    second.load_state_dict(first.state_dict())
    assert head + _trajectory(second, values[4:]) == straight


@pytest.mark.parametrize("make", [DynamicLossScaler, grad_scaler], ids=["ours", "torch"])
def test_scale_never_grows_past_float32_max(make):
    scaler = make(init_scale=2.0**127, growth_interval=1)
    assert _trajectory(scaler, [0.0, 0.0]) == [2.0**127, 2.0**127]  # 2**128 is inf in float32


def test_protocol_misuse_raises_sentences():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = DynamicLossScaler()
    with pytest.raises(RuntimeError, match="call step"):
        scaler.update()
    scaler.scale(weight.sum()).backward()
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="already called"):
        scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(optimizer)
    half = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    half.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 gradients"):
        FixedLossScaler().unscale_(torch.optim.SGD([half], lr=0.1))
    for bad in (dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(growth_interval=0)):
        with pytest.raises(ValueError, match="must be"):
            DynamicLossScaler(**bad)


def test_fixed_scale_writes_overflow_into_the_weights_and_dynamic_skips_it():
    grads = torch.tensor([[0.1, 0.1], [INF, 0.1], [0.1, 0.1]])
    assert not torch.isfinite(naive.replay_steps(grads)["weight"]).all()  # naive's documented limit
    out = fast.replay_steps(grads)
    assert out["stepped"] == [True, False, True] and torch.isfinite(out["weight"]).all()


def test_fp16_training_in_the_shared_loop_is_bit_identical_with_ours_and_grad_scaler():
    recipe = Recipe(iters=12, n_layer=1, n_embd=32, chars=200_000)
    # 2**24 overflows the fp16 backward: the first steps are skipped until the scale fits, then it grows
    scalers = [make(init_scale=2.0**24, growth_interval=3) for make in (DynamicLossScaler, grad_scaler)]
    ours, theirs = (train_and_evaluate(fresh_model(recipe), "fp16", recipe, s) for s in scalers)
    assert math.isfinite(ours) and ours == theirs
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**24


def test_fp16_short_run_trains_like_fp32():
    recipe = Recipe(iters=12, n_layer=1, n_embd=32, chars=200_000)
    fp32 = train_and_evaluate(fresh_model(recipe), "fp32", recipe)
    assert abs(train_and_evaluate(fresh_model(recipe), "fp16", recipe) - fp32) <= 0.02


def test_bf16_weights_take_exactly_half_the_bytes_and_autocast_keeps_fp32():
    model = build_model(Shape(n_layer=1, n_head=2, n_embd=32, block_size=16))
    low = to_low_precision(model, "bf16")
    assert 2 * weight_bytes(low) == weight_bytes(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    with pytest.raises(ValueError, match="precision must be one of"):
        to_low_precision(model, "fp8")


def test_bf16_inference_logits_are_within_bf16_rounding_of_float64():
    config, state = random_gpt(0, n_layer=2, n_head=4, head_dim=16, vocab_size=65, block_size=32, peaked=True)
    idx = torch.randint(65, (2, 32), generator=torch.Generator().manual_seed(0))
    truth = autocast_logits(config, {k: v.double() for k, v in state.items()}, idx)
    assert truth.dtype == torch.float64  # autocast leaves float64 alone: the oracle is exact
    scale = truth.abs().max().item()
    for fn in (bf16_logits, autocast_logits):
        out = fn(config, state, idx)
        assert out.dtype == torch.bfloat16
        # 8-bit mantissa: 2**-8 relative per rounding, a few roundings deep
        assert (out.double() - truth).abs().max().item() <= 2**-4 * scale


def test_bf16_autocast_saves_fewer_activation_bytes_for_backward():
    shape = Shape(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=8)
    model = build_model(shape)
    assert saved_activation_bytes(model, "bf16", shape) < saved_activation_bytes(model, "fp32", shape)


def test_cli_prints_the_table_and_saves_the_plot(tmp_path, capsys):
    plot = tmp_path / "bars.png"
    args = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "2",
            "--rounds", "1", "--precisions", "fp32,bf16,fp16", "--plot", str(plot)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train_step_ms" in out and all(p in out for p in ("fp32", "bf16", "fp16"))
    assert plot.stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["--precisions", "fp8"])
