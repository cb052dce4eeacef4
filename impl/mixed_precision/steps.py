"""The pieces every precision comparison of one GPT is made of: its shape, a fresh model, a batch,
a training-step closure (AMP, fp32 master weights, a ``DynamicLossScaler`` for fp16) and an
inference-forward closure (weights stored in the precision, or fp32 under autocast).

The claim workloads and the ``python -m impl.mixed_precision`` table time these closures; the
timing itself lives in ``benchmarks/workloads/mixed_precision.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from impl.gpt.model import GPT, GPTConfig
from impl.mixed_precision.fast import DynamicLossScaler
from impl.mixed_precision.inference import to_low_precision
from impl.train.loop import TrainConfig, autocast, make_optimizer, train_step

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Shape:
    """Model and batch shape. The default is wide enough (512) that matmuls dominate the step."""

    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 128
    batch_size: int = 8
    vocab_size: int = 65


def build_model(shape: Shape, device: str = "cpu", seed: int = 0) -> GPT:
    """A freshly initialised fp32 GPT of ``shape`` on ``device``."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=shape.vocab_size, block_size=shape.block_size, n_layer=shape.n_layer,
                       n_head=shape.n_head, n_embd=shape.n_embd)
    return GPT(config).to(device)


def random_batch(shape: Shape, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids x and targets y, each (batch_size, block_size)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randint(shape.vocab_size, (2, shape.batch_size, shape.block_size), generator=gen)
    return x.to(device), y.to(device)


def training_step(model: GPT, precision: str, shape: Shape) -> Callable[[], float]:
    """A closure taking one AdamW step on its own copy of ``model`` (fp32 master weights) under
    ``precision``'s autocast; fp16 gets a ``DynamicLossScaler``. Returns the step's loss."""
    model = copy.deepcopy(model).train()
    device = next(model.parameters()).device.type
    optimizer = make_optimizer(model, TrainConfig())
    scaler = DynamicLossScaler() if precision == "fp16" else None
    x, y = random_batch(shape, device)
    return lambda: train_step(model, optimizer, [(x, y)], precision, scaler).item()


def inference_forward(
    model: GPT, precision: str, shape: Shape, mode: str = "weights"
) -> Callable[[], torch.Tensor]:
    """A closure returning the logits (B, T, vocab) of one forward pass without gradients.

    ``mode="weights"`` stores the weights in ``precision`` (``to_low_precision``);
    ``mode="autocast"`` keeps them fp32 and runs matmuls in ``precision`` under autocast."""
    device = next(model.parameters()).device.type
    x, _ = random_batch(shape, device)
    if precision != "fp32" and mode == "weights":
        model = to_low_precision(model, precision)
    model = model.eval()

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with autocast(precision if mode == "autocast" else "fp32", device):
            return model(x)

    return forward
