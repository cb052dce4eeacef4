"""bf16 inference, two ways:

- **bf16 weights** (``model.to(torch.bfloat16)``): weights and activations are bf16. Half the
  weight memory and no per-op casts; the residual stream is rounded to 8 bits of mantissa
  after every block.
- **autocast** (``torch.autocast(device, torch.bfloat16)``): weights stay fp32 (full memory),
  each matmul casts its inputs to bf16 and accumulates in fp32; ops autocast lists as
  precision-sensitive (softmax, layer norm, losses) stay fp32.

Both keep the large reductions in fp32 inside the kernels, which is why bf16 (8 exponent bits,
fp32's range) needs no loss or activation scaling, unlike fp16.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from impl.gpt.model import GPT

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_low_precision(model: torch.nn.Module, precision: str = "bf16") -> torch.nn.Module:
    """A copy of ``model`` with every parameter and buffer cast to bf16 (or fp16), in eval mode."""
    if precision not in LOW_PRECISION:
        raise ValueError(f"precision must be one of {', '.join(LOW_PRECISION)}, got {precision!r}")
    return copy.deepcopy(model).to(LOW_PRECISION[precision]).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the parameters and buffers (each tied tensor once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def bf16_logits(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab), bf16, of the GPT ``config`` with weights ``state`` stored in bf16."""
    model = GPT.from_state(config, {k: v.to(torch.bfloat16) for k, v in state.items()})
    return model(idx)


@torch.no_grad()
def autocast_logits(
    config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor
) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT ``config`` with weights ``state`` kept in fp32 (float64
    stays float64: autocast leaves it alone, which makes this the float64 oracle too) and
    matmuls run in bf16 under autocast."""
    master = torch.float64 if next(iter(state.values())).dtype == torch.float64 else torch.float32
    model = GPT.from_state(config, {k: v.to(master) for k, v in state.items()})
    with torch.autocast(idx.device.type, dtype=torch.bfloat16):
        return model(idx)
