"""LoRA as the paper writes it (Hu et al., 2021): h = W0 x + (alpha / r) B A x.

The pretrained W0 (out, in) is frozen; A (r, in) starts kaiming-uniform (as PEFT does) and B (out, r)
at zero, so training starts from exactly the pretrained model. Two plain matmuls, no merging,
no tricks: the readable yardstick for ``fast.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.gpt.model import GPT


class NaiveLoRALinear(nn.Module):
    """y = x W^T + b + (dropout(x) A^T B^T) * (alpha / r), W and b frozen copies of ``base``'s."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)  # (out, in)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False) if base.bias is not None else None
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # W0 x
        low_rank = self.dropout(x) @ self.lora_A.T  # (..., r)
        return h + (low_rank @ self.lora_B.T) * self.scale


def lora_logits(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                idx: torch.Tensor, rank: int, alpha: float, targets: tuple[str, ...]) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT ``(config, state)`` with a ``NaiveLoRALinear`` on every linear
    named in ``targets``, holding ``adapter`` (``"<module>.lora_A"`` (r, in), ``"<module>.lora_B"`` (out, r))."""
    model = GPT.from_state(config, state)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent, _, child = name.rpartition(".")
            lora = NaiveLoRALinear(module, rank, alpha)
            with torch.no_grad():
                lora.lora_A.copy_(adapter[f"{name}.lora_A"])
                lora.lora_B.copy_(adapter[f"{name}.lora_B"])
            setattr(model.get_submodule(parent), child, lora)
    with torch.no_grad():
        return model(idx)
