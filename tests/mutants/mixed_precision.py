"""Mutants of project 7: loss scalers broken in the ways real ones break, and mixed precision
training that quietly is not."""

from __future__ import annotations

from typing import Any

import torch

import impl.train.loop as loop
from impl.mixed_precision.fast import DynamicLossScaler
from impl.mixed_precision.naive import FixedLossScaler
from impl.mixed_precision.replay import replay
from impl.mixed_precision.training import Recipe, fresh_model, train_and_evaluate


class _NeverBacksOff(DynamicLossScaler):
    def update(self, new_scale: float | None = None) -> None:
        kept = self._scale.clone()
        overflowed = any(self._found_inf.values())
        super().update(new_scale)
        if overflowed:
            self._scale.copy_(kept)  # skips the step but keeps the scale that overflowed


class _StepsOnOverflow(DynamicLossScaler):
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        self._stepped.add(id(optimizer))
        return optimizer.step(*args, **kwargs)  # inf/nan gradients go into the weights


class _GrowsEveryStep(DynamicLossScaler):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.growth_interval = 1  # the interval is ignored


class _ClipsScaledGradients(DynamicLossScaler):
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        # checks for overflow but leaves the division for step(): the caller clips scaled gradients
        finite = all(bool(torch.isfinite(g).all()) for g in self._grads(optimizer))
        self._found_inf[id(optimizer)] = not finite
        self._pending = True

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_pending", False):
            with torch.no_grad():
                for g in self._grads(optimizer):
                    g.mul_(self._inv_scale())
            self._pending = False
        return super().step(optimizer, *args, **kwargs)


def _dynamic(cls: type[DynamicLossScaler]):
    def replay_steps(grads, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                     lr=0.1, max_norm=0.0):
        return replay(cls(init_scale, growth_factor, backoff_factor, growth_interval), grads, lr, max_norm)

    return replay_steps


never_backs_off = _dynamic(_NeverBacksOff)
steps_on_overflow = _dynamic(_StepsOnOverflow)
grows_every_step = _dynamic(_GrowsEveryStep)
clips_scaled_gradients = _dynamic(_ClipsScaledGradients)


class _NeverUnscales(FixedLossScaler):
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self._unscaled.add(id(optimizer))  # marks the gradients unscaled without dividing them


def never_unscales(grads, init_scale=2.0**16, lr=0.1, max_norm=0.0):
    return replay(_NeverUnscales(init_scale), grads, lr, max_norm)


def no_loss_scaling(grads, init_scale=2.0**16, lr=0.1, max_norm=0.0):
    return replay(FixedLossScaler(1.0), grads, lr, max_norm)  # fp16 backward on unscaled gradients


def no_fp32_master_weights(precision: str = "bf16", **recipe: Any) -> float:
    """Weights, gradients and AdamW state all in bf16: small updates round away."""
    r = Recipe(**recipe)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return train_and_evaluate(fresh_model(r).to(low), "fp32", r)


def autocast_on_wrong_device(precision: str = "bf16", **recipe: Any) -> float:
    """``torch.autocast("cuda")`` around a CPU model (or the reverse): silently plain fp32."""
    original = loop.autocast

    def wrong_device(dtype: str, device: str) -> torch.autocast:
        other = "cpu" if device == "cuda" else "cuda"
        enabled = torch.cuda.is_available() and dtype != "fp32"  # autocast("cuda") without CUDA warns
        return torch.autocast(other, dtype=loop.DTYPES[dtype], enabled=enabled)

    loop.autocast = wrong_device
    try:
        r = Recipe(**recipe)
        return train_and_evaluate(fresh_model(r), precision, r)
    finally:
        loop.autocast = original
