"""A scripted fp16 training run: the same steps ``impl.train.loop`` takes, on gradients we choose.

To compare loss scalers exactly (ours against ``torch.amp.GradScaler``) we need runs where we
decide which steps overflow. Here the "model" is one weight vector w and the loss at step t is
``mean(w * g_t)``, computed in fp16 as autocast would, so dloss/dw = g_t / n. The backward pass
runs in fp16 too: the scaled gradient ``scale * g_t / n`` overflows to inf when it exceeds
fp16's 65504, underflows when it is below 2**-24, and ``g_t`` may itself hold inf or nan.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from impl.train.loop import LossScaler


class ScalerWithScale(LossScaler, Protocol):
    """The loop's scaler protocol plus ``get_scale``, which the replay records."""

    def get_scale(self) -> float: ...


def replay(
    scaler: ScalerWithScale, grads: torch.Tensor, lr: float = 0.1, max_norm: float = 0.0
) -> dict[str, Any]:
    """Take one scaled step per row of ``grads`` (steps, n) with SGD (momentum 0.9).

    Each step is the loop's protocol: ``scale(loss).backward()``, ``unscale_``, clip to
    ``max_norm`` (0 = off), ``step``, ``update``. Returns a dict:
    ``scales`` (scale after each update), ``stepped`` (whether the optimizer stepped),
    ``grads`` (the gradients the optimizer stepped with, (stepped steps, n)) and ``weight`` (n,).
    """
    if grads.dim() != 2:
        raise ValueError(f"grads must be (steps, n), got shape {tuple(grads.shape)}")
    steps, n = grads.shape
    weight = torch.nn.Parameter(torch.linspace(-1.0, 1.0, n))  # a fixed, non-trivial start
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.9)
    seen: list[torch.Tensor] = []
    # a pre-step hook sees exactly the steps the scaler lets through, and their gradients
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(weight.grad.detach().clone()))
    scales, stepped = [], []
    for t in range(steps):
        loss = (weight.half() * grads[t].half()).float().mean()  # fp16 compute, fp32 loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_([weight], max_norm)
        before = len(seen)
        scaler.step(optimizer)
        scaler.update()
        stepped.append(len(seen) > before)
        scales.append(scaler.get_scale())
        optimizer.zero_grad(set_to_none=True)
    return {
        "scales": scales,
        "stepped": stepped,
        "grads": torch.stack(seen) if seen else torch.empty(0, n),
        "weight": weight.detach().clone(),
    }
