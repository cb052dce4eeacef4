"""Loss scaling with a fixed scale: the idea of Micikevicius et al. (2018), section 3.2, in its
simplest form.

fp16 has 5 exponent bits: gradients below 2**-24 flush to zero and many real gradients sit
there. Multiplying the loss by a constant S shifts every gradient up by S (the chain rule is
linear), so they survive the fp16 backward pass; dividing the fp32 gradients by S before the
optimizer step gives back the true gradient. With S a power of two both multiplications are
exact.

What this version does NOT do: notice an overflow. If S * gradient exceeds fp16's 65504 the
gradient is inf, and the optimizer step writes inf/nan into the weights. ``fast.py`` adds that.

The interface is ``torch.amp.GradScaler``'s, so ``impl.train.loop.train(..., scaler=...)`` runs
either one::

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)          # optional: needed to clip true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)              # unscales first if unscale_ was not called
    scaler.update()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from impl.mixed_precision.replay import replay


class FixedLossScaler:
    """Scale the loss by a constant ``init_scale``; unscale the gradients before the step."""

    def __init__(self, init_scale: float = 2.0**16):
        if not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale}")
        # float32, like GradScaler's scale tensor: the loss is multiplied in float32
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32)
        self._unscaled: set[int] = set()  # ids of optimizers unscaled since the last update()

    def scale(self, outputs: torch.Tensor | Iterable[torch.Tensor]) -> Any:
        """``outputs`` (a tensor or a list/tuple of tensors) multiplied by the scale."""
        if isinstance(outputs, torch.Tensor):
            return outputs * self._scale.to(outputs.device)
        return type(outputs)(self.scale(t) for t in outputs)

    def _inv_scale(self) -> torch.Tensor:
        # GradScaler's recipe: 1/scale computed in float64, then rounded to float32
        return self._scale.double().reciprocal().float()

    @staticmethod
    def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for g in grads:
            if g.dtype == torch.float16:
                raise ValueError(
                    "cannot unscale float16 gradients: keep the weights in float32 (autocast casts "
                    "them per op) so their gradients are float32"
                )
        return grads

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of ``optimizer``'s parameters by the scale, in place (once per step)."""
        if id(optimizer) in self._unscaled:
            raise RuntimeError("unscale_() was already called on this optimizer since the last update()")
        inv_scale = self._inv_scale()
        with torch.no_grad():
            for g in self._grads(optimizer):
                g.mul_(inv_scale.to(g.device))
        self._unscaled.add(id(optimizer))

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless already done) and take the optimizer step; returns what it returns."""
        if id(optimizer) not in self._unscaled:
            self.unscale_(optimizer)
        return optimizer.step(*args, **kwargs)

    def update(self) -> None:
        """End of the iteration: the scale stays fixed, only the unscale bookkeeping resets."""
        self._unscaled.clear()

    def get_scale(self) -> float:
        """The current scale as a Python float."""
        return float(self._scale)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.get_scale()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale.fill_(float(state["scale"]))


def replay_steps(
    grads: torch.Tensor, init_scale: float = 2.0**16, lr: float = 0.1, max_norm: float = 0.0
) -> dict[str, Any]:
    """Train one weight vector on the scripted gradients ``grads`` (steps, n) with a fixed scale;
    see ``impl.mixed_precision.replay.replay`` for what is returned."""
    return replay(FixedLossScaler(init_scale), grads, lr, max_norm)
