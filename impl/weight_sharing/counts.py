"""Parameter counts of tied / untied, layer-shared and factorized GPTs: project 3's closed form, extended.

``impl.pretrain.config.param_count`` counts our GPT with biases and a tied head:

    V*C + P*C + L * (12*C^2 + 13*C) + 2*C

Every variant here is that count plus or minus whole pieces of it, and each piece is read off the
same function (so there is one formula, not two):

- untied head: + V*C (a second V x C matrix, no bias: GPT-2's and HF's ``lm_head``);
- cross-layer sharing with U distinct weight sets among L layers: - (L - U) * block, where
  block = count(L=1) - count(L=0) = 12*C^2 + 13*C;
- factorized embedding of inner size E (tied): - V*C + V*E + E*C.

GPT-2 small (V = 50,257, P = 1,024, L = 12, C = 768): 124,439,808 tied, 163,037,184 untied: tying
saves 38,597,376 parameters, 23.7% of the untied model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from impl.gpt.model import GPT, GPTConfig
from impl.pretrain.config import param_count as tied_param_count
from impl.weight_sharing.factorized import factorize_embeddings
from impl.weight_sharing.sharing import share_layers


def distinct_layers(n_layer: int, layer_groups: Sequence[Sequence[int]] | None) -> int:
    """Layers with their own weights: each group of shared layers counts once."""
    if layer_groups is None:
        return n_layer
    return n_layer - sum(max(0, len(g) - 1) for g in layer_groups)


def param_count(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, tied: bool = True,
                layer_groups: Sequence[Sequence[int]] | None = None, embed_dim: int | None = None) -> int:
    """Closed-form parameter count of our GPT (biases on) with the head ``tied`` or not, its layers shared
    as ``layer_groups`` (``impl.weight_sharing.sharing.share_layers``) and, if ``embed_dim`` is given, a
    factorized tied embedding of that inner size (``factorize_embeddings``)."""
    shape = dict(vocab_size=vocab_size, block_size=block_size, n_head=n_head, n_embd=n_embd)
    count = tied_param_count(n_layer=n_layer, **shape)
    block = tied_param_count(n_layer=1, **shape) - tied_param_count(n_layer=0, **shape)
    table = count - tied_param_count(n_layer=n_layer, **{**shape, "vocab_size": 0})  # V*C
    count -= (n_layer - distinct_layers(n_layer, layer_groups)) * block
    if embed_dim is not None:
        if not tied:
            raise ValueError("a factorized embedding keeps its head tied: pass tied=True")
        count += vocab_size * embed_dim + embed_dim * n_embd - table
    return count if tied else count + table


def build(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, tied: bool = True,
          layer_groups: Sequence[Sequence[int]] | None = None, embed_dim: int | None = None) -> GPT:
    """Our GPT of this shape built that way (on the current default device)."""
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, bias=True, tie_embeddings=tied))
    if layer_groups is not None:
        share_layers(model, layer_groups)
    if embed_dim is not None:
        factorize_embeddings(model, embed_dim)
    return model


def counted_params(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, tied: bool = True,
                   layer_groups: Sequence[Sequence[int]] | None = None, embed_dim: int | None = None) -> int:
    """Parameters of the model ``build`` makes, counted on the meta device (each shared tensor once)."""
    with torch.device("meta"):
        return build(vocab_size, block_size, n_layer, n_head, n_embd, tied, layer_groups, embed_dim).num_params()
