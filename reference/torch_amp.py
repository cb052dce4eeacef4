"""``torch.amp.GradScaler``: the peer our loss scalers are checked against, step for step."""

from __future__ import annotations

from typing import Any

import torch

from impl.mixed_precision.replay import replay


def grad_scaler(
    init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
    growth_interval: int = 2000, device: str = "cpu",
) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` for ``device`` with these settings."""
    return torch.amp.GradScaler(device, init_scale=init_scale, growth_factor=growth_factor,
                                backoff_factor=backoff_factor, growth_interval=growth_interval)


def replay_steps(
    grads: torch.Tensor,
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    lr: float = 0.1,
    max_norm: float = 0.0,
) -> dict[str, Any]:
    """``impl.mixed_precision.replay.replay`` driven by ``torch.amp.GradScaler("cpu")``."""
    scaler = grad_scaler(init_scale, growth_factor, backoff_factor, growth_interval)
    return replay(scaler, grads, lr, max_norm)
