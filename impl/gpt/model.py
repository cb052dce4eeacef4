"""The one GPT model every project shares: a GPT-2-style decoder in one file.

Seams later projects plug into without forking this file:
- attention backend: ``GPTConfig.attention`` names a function registered in ``attention.py``
  (naive, sdpa; flash, sparse, split-K, paged add themselves);
- KV cache: ``forward(idx, cache=...)`` takes any object with ``position``,
  ``update(layer, k, v) -> (k_all, v_all)`` and ``advance(n_tokens)`` (P8, P10, P13, P15);
- linear layers: plain ``nn.Linear`` modules named like GPT-2's (``c_attn``, ``c_proj``,
  ``c_fc``) so LoRA, quantized and sharded layers replace them by name (P5, P14, P16, P23);
- block structure: ``model.blocks`` is a plain ``nn.ModuleList``;
- precision: works under ``torch.autocast`` (bf16, fp16).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from impl.gpt.attention import get_attention


@dataclass
class GPTConfig:
    """Plain data: the shape of the model and which attention backend it runs."""

    vocab_size: int = 65
    block_size: int = 64  # longest context the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVCacheLike(Protocol):
    """What ``GPT.forward`` needs from a KV cache."""

    position: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, n_tokens: int) -> None: ...


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attend = get_attention(config.attention)

    def forward(self, x: torch.Tensor, cache: KVCacheLike | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
        y = self.attend(q, k, v, True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCacheLike | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor], **overrides: Any) -> GPT:
        """A model of shape ``config`` (with ``overrides``, e.g. ``attention="naive"``) holding
        weights ``state``, in the weights' dtype, in eval mode."""
        model = cls(GPTConfig(**{**config, **overrides}))
        model.load_state_dict(state, strict=False)  # a state without the tied lm_head is fine
        return model.to(dtype=next(iter(state.values())).dtype).eval()

    def set_attention(self, name: str) -> None:
        """Switch every layer to another registered attention backend (weights untouched)."""
        fn = get_attention(name)
        self.config.attention = name
        for block in self.blocks:
            block.attn.attend = fn

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); without position embeddings if ``non_embedding``."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, cache: KVCacheLike | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), continuing ``cache`` if given."""
        B, T = idx.shape
        start = cache.position if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and cache is None:
                # keep only block inputs; recompute activations in backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index
    )
