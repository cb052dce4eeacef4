"""Dynamic loss scaling: the fixed scale of ``naive.py`` plus overflow handling (Micikevicius et
al., 2018, section 3.2; the rule ``torch.amp.GradScaler`` implements).

A fixed scale must be small enough never to overflow and large enough to rescue small
gradients; no single value is right for a whole run. So:

- start high (2**16);
- on a step whose gradients hold any inf or nan: SKIP the optimizer step (the weights stay
  as they were) and multiply the scale by ``backoff_factor`` (0.5);
- after ``growth_interval`` clean steps in a row: multiply it by ``growth_factor`` (2).

The scale then hovers just below the largest value that does not overflow. It lives in a
float32 tensor and every update is rounded to float32, exactly as GradScaler does, so the two
follow the same trajectory bit for bit (the spec checks it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from impl.mixed_precision.naive import FixedLossScaler
from impl.mixed_precision.replay import replay


class DynamicLossScaler(FixedLossScaler):
    """``torch.amp.GradScaler``'s interface and scale rule, written out."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1 (to grow), got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be between 0 and 1 (to shrink), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive number of steps, got {growth_interval}")
        super().__init__(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._growth_tracker = 0  # clean steps since the scale last changed
        self._found_inf: dict[int, bool] = {}  # per optimizer unscaled in this iteration
        self._stepped: set[int] = set()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place and record whether any is inf or nan."""
        key = id(optimizer)
        if key in self._stepped:
            raise RuntimeError("unscale_() was called after step(); call it between backward() and step()")
        if key in self._found_inf:
            raise RuntimeError("unscale_() was already called on this optimizer since the last update()")
        inv_scale = self._inv_scale()
        found_inf = False
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in self._grads(optimizer):
            by_device.setdefault(g.device, []).append(g)
        with torch.no_grad():
            for device, grads in by_device.items():
                # one pass per device: max|g| is finite iff every element is (max propagates nan)
                peaks = torch.stack([p.float() for p in torch._foreach_norm(grads, math.inf)])
                found_inf |= not bool(peaks.isfinite().all())
                torch._foreach_mul_(grads, inv_scale.to(device))  # multi-tensor: one kernel, not one per grad
        self._found_inf[key] = found_inf

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless already done), then step only if every gradient is finite.

        Returns the optimizer's return value, or None for a skipped step."""
        key = id(optimizer)
        if "closure" in kwargs:
            raise RuntimeError("step(closure=...) is not supported with loss scaling: call backward yourself")
        if key in self._stepped:
            raise RuntimeError("step() was already called on this optimizer since the last update()")
        if key not in self._found_inf:
            self.unscale_(optimizer)
        self._stepped.add(key)
        if self._found_inf[key]:
            return None  # overflow: these gradients are garbage, the weights keep their values
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """End of the iteration: back off after an overflow, grow after ``growth_interval``
        clean steps (or set ``new_scale``)."""
        if new_scale is not None:
            self._scale.fill_(float(new_scale))
        elif not self._found_inf:
            raise RuntimeError("update() found no overflow check: call step(optimizer) before update()")
        elif any(self._found_inf.values()):
            # fill_ rounds the float64 product to float32, like GradScaler's kernel
            self._scale.fill_(float(self._scale) * self.backoff_factor)
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                grown = torch.tensor(float(self._scale) * self.growth_factor, dtype=torch.float32)
                if torch.isfinite(grown):  # never grow into inf: float32 tops out at 2**128
                    self._scale.copy_(grown)
                self._growth_tracker = 0
        self._found_inf.clear()
        self._stepped.clear()

    def state_dict(self) -> dict[str, Any]:
        """The same keys as ``GradScaler.state_dict()``: each can load the other's state."""
        return {
            "scale": self.get_scale(),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": self._growth_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])


def replay_steps(
    grads: torch.Tensor,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    lr: float = 0.1,
    max_norm: float = 0.0,
) -> dict[str, Any]:
    """Train one weight vector on the scripted gradients ``grads`` (steps, n) with dynamic loss
    scaling; see ``impl.mixed_precision.replay.replay`` for what is returned."""
    scaler = DynamicLossScaler(init_scale, growth_factor, backoff_factor, growth_interval)
    return replay(scaler, grads, lr, max_norm)
