"""QLoRA on a LLaMA-7B-shaped GPT: LoRA adapters over a frozen NF4 base, built without ever holding
the full-precision model.

The model is declared on the meta device (shapes only, no memory); each target linear is then
given a random bf16 weight, quantized to NF4 and the bf16 copy freed, one layer at a time, so the
process never holds more than one layer's full-precision weight (at most 4096 x 16384 x 2 bytes =
128 MiB). Embeddings and norms are materialized in bf16; the adapters train in fp32 with
bitsandbytes' 8-bit AdamW.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.lora.fast import TARGETS, apply_lora, trainable_parameters
from impl.lora.nf4 import NF4Linear, quantize_nf4

# LLaMA-7B's width, depth, heads and vocabulary on the shared GPT (GPT-2 blocks: LayerNorm, a GELU MLP
# 4x wide, learned positions), 6.6e9 parameters. block_size only sizes the position table (8 M parameters).
LLAMA_7B_SHAPE = {"vocab_size": 32000, "block_size": 2048, "n_layer": 32, "n_head": 32, "n_embd": 4096,
                  "bias": False, "dropout": 0.0}


def build_qlora_model(config: dict[str, Any] | None = None, rank: int = 8, alpha: float = 16,
                      targets: tuple[str, ...] = TARGETS, dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0) -> GPT:
    """A GPT of shape ``config`` (default LLaMA-7B-shaped) with random NF4 weights on every target
    linear, ``dtype`` embeddings and norms, and trainable fp32 LoRA adapters (everything else frozen)."""
    config = {**LLAMA_7B_SHAPE, **(config or {})}
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            weight = torch.empty(module.out_features, module.in_features, dtype=dtype)
            weight.normal_(0.0, 0.02, generator=gen)
            bias = torch.zeros(module.out_features, dtype=dtype) if module.bias is not None else None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear(quantize_nf4(weight), bias))
            del weight  # the layer's only full-precision copy
    for module in model.modules():  # what is left on meta: embeddings, norms (and an untied head)
        for pname, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                value = torch.empty(p.shape, dtype=dtype)
                if isinstance(module, nn.LayerNorm):
                    value.fill_(1.0 if pname == "weight" else 0.0)
                else:
                    value.normal_(0.0, 0.02, generator=gen)
                module._parameters[pname] = nn.Parameter(value, requires_grad=False)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    apply_lora(model, targets, rank, alpha, seed=seed)
    return model


def training_step(model: GPT, optimizer: torch.optim.Optimizer, batch: int = 1, seq_len: int = 64,
                  seed: int = 0) -> float:
    """One step on random tokens (batch, seq_len): forward, next-token loss, backward, optimizer step.
    Returns the loss."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(model.config.vocab_size, (batch, seq_len + 1), generator=gen)
    model.train()
    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def qlora_step_report(config: dict[str, Any] | None = None, rank: int = 8, steps: int = 2, seq_len: int = 64,
                      gradient_checkpointing: bool = False) -> dict[str, Any]:
    """Build the QLoRA model, run ``steps`` training steps with 8-bit AdamW over the adapters and
    report seconds per step, losses, parameter counts and the bytes the weights take."""
    import bitsandbytes as bnb

    start = time.perf_counter()
    model = build_qlora_model(config, rank=rank)
    model.config.gradient_checkpointing = gradient_checkpointing
    build_s = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    step_s, losses = [], []
    for step in range(steps):
        start = time.perf_counter()
        losses.append(training_step(model, optimizer, seq_len=seq_len, seed=step))
        step_s.append(time.perf_counter() - start)
    trainable, total = trainable_parameters(model)
    nf4_bytes = sum(m.nf4().nbytes() for m in model.modules() if isinstance(m, NF4Linear))
    other_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"build_s": build_s, "step_s": step_s, "losses": losses, "trainable": trainable, "total": total,
            "fp32_weight_bytes": 4 * (total - trainable), "nf4_weight_bytes": nf4_bytes,
            "other_param_bytes": other_bytes, "seq_len": seq_len, "rank": rank}
