"""Factorized embeddings (ALBERT, Lan et al. 2019): a (V, E) table and an (E -> H) projection, E << H.

A token's identity needs far fewer numbers than the width the blocks compute in, so the V x H table
becomes V x E + E x H (for V = 2,048, H = 128, E = 32: 69,632 numbers instead of 262,144). The head
stays tied: it maps the last hidden state back with the projection's transpose (H -> E) and scores
against the same table (E -> V), so the factorized pair is used twice, like the plain tied matrix.

Built by module replacement on the shared model: ``model.wte`` becomes a ``FactorizedEmbedding``
and ``model.lm_head`` a ``FactorizedHead`` holding the *same* two ``nn.Parameter`` objects.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.gpt.model import GPT


class FactorizedEmbedding(nn.Module):
    """Token ids (B, T) -> (B, T, H) through ``table`` (V, E) then ``proj`` (E -> H, no bias)."""

    def __init__(self, vocab_size: int, embed_dim: int, n_embd: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, embed_dim)
        self.proj = nn.Linear(embed_dim, n_embd, bias=False)
        nn.init.normal_(self.table.weight, mean=0.0, std=0.02)
        # unit-variance columns: table @ proj^T then has GPT's 0.02 spread per coordinate
        nn.init.normal_(self.proj.weight, mean=0.0, std=1.0 / math.sqrt(embed_dim))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(idx))  # (B, T, E) -> (B, T, H)


class FactorizedHead(nn.Module):
    """Hidden states (B, T, H) -> logits (B, T, V) with the embedding's own two tensors (tied)."""

    def __init__(self, embedding: FactorizedEmbedding):
        super().__init__()
        self.proj_weight = embedding.proj.weight  # (H, E): the same Parameter as the embedding's
        self.weight = embedding.table.weight  # (V, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.proj_weight.t())  # (B, T, H) @ (H, E) -> (B, T, E)
        return F.linear(z, self.weight)  # (B, T, E) @ (E, V) -> (B, T, V)


def factorize_embeddings(model: GPT, embed_dim: int) -> GPT:
    """Replace ``model``'s token embedding and head by a freshly initialised factorized, tied pair of
    inner size ``embed_dim`` (on the model's device and dtype); returns ``model``. For training from
    scratch: the old (V, H) weights are dropped."""
    if not model.config.tie_embeddings:
        raise ValueError("factorized embeddings keep the head tied; build the model with tie_embeddings=True")
    if not 1 <= embed_dim <= model.config.n_embd:
        raise ValueError(f"embed_dim must be between 1 and n_embd = {model.config.n_embd}, got {embed_dim}")
    ref = model.wte.weight
    embedding = FactorizedEmbedding(model.config.vocab_size, embed_dim, model.config.n_embd)
    model.wte = embedding.to(device=ref.device, dtype=ref.dtype)
    model.lm_head = FactorizedHead(model.wte)
    return model
