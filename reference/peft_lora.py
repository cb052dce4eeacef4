"""PEFT's LoRA injected into our GPT (``peft.inject_adapter_in_model`` on its ``nn.Linear`` layers),
holding the same A and B: the peer our LoRA must match in outputs, gradients and trainable count.

Adapter keys are ours (``"<module>.lora_A"``); PEFT names them ``"<module>.lora_A.default.weight"``.
Nothing from ``impl.lora`` is imported: the oracle shares no code with what it checks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from impl.gpt.model import GPT, GPTConfig


def _peft_model(model: torch.nn.Module, rank: int, alpha: float, targets: tuple[str, ...]) -> torch.nn.Module:
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none")
    return inject_adapter_in_model(config, model)


def _with_adapter(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                  rank: int, alpha: float, targets: tuple[str, ...]) -> torch.nn.Module:
    model = _peft_model(GPT.from_state(config, state), rank, alpha, targets)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in adapter.items():
            module, _, ab = key.rpartition(".")
            params[f"{module}.{ab}.default.weight"].copy_(value)
    return model


def lora_logits(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                idx: torch.Tensor, rank: int, alpha: float, targets: tuple[str, ...]) -> torch.Tensor:
    """Logits (B, T, vocab) of our GPT with PEFT's LoRA layers holding ``adapter``."""
    with torch.no_grad():
        return _with_adapter(config, state, adapter, rank, alpha, targets)(idx)


def lora_logits_and_grads(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                          idx: torch.Tensor, rank: int, alpha: float,
                          targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Logits and the next-token loss's gradient for every adapter tensor, under our key names."""
    model = _with_adapter(config, state, adapter, rank, alpha, targets)
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), idx[:, 1:].reshape(-1)).backward()
    params = dict(model.named_parameters())
    grads = {f"grad:{key}": params[f"{key.rpartition('.')[0]}.{key.rpartition('.')[2]}.default.weight"].grad
             for key in adapter}
    return {"logits": logits.detach(), **grads}


def trainable_count(config: dict[str, Any], rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(trainable, total) parameters of a GPT of shape ``config`` on the meta device after PEFT's
    injection (which freezes everything but the adapters), tied weights once."""
    with torch.device("meta"):
        model = _peft_model(GPT(GPTConfig(**config)), rank, 2 * rank, targets)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
