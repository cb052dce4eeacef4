"""Mutants of project 19: miscounted closed forms, tying that trains the tensor through one use only,
and layer sharing that shares modules (hence KV-cache slots) instead of parameters."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.gpt.model import GPT, lm_loss
from impl.kv_cache import fast as kv_fast
from impl.weight_sharing import counts

# --- closed-form counts ---------------------------------------------------------------------------

def formula_ignores_untied_head(vocab_size, block_size, n_layer, n_head, n_embd, tied=True, **variant):
    """Counts every model as tied."""
    return counts.param_count(vocab_size, block_size, n_layer, n_head, n_embd, True, **variant)


def untied_head_with_bias(vocab_size, block_size, n_layer, n_head, n_embd, tied=True, **variant):
    """Gives an untied head a bias (GPT-2's lm_head has none)."""
    n = counts.param_count(vocab_size, block_size, n_layer, n_head, n_embd, tied, **variant)
    return n if tied else n + vocab_size


def sharing_saves_every_layer_of_a_group(vocab_size, block_size, n_layer, n_head, n_embd, tied=True,
                                         layer_groups=None, embed_dim=None):
    """Subtracts a whole group's blocks, forgetting that the group keeps one."""
    n = counts.param_count(vocab_size, block_size, n_layer, n_head, n_embd, tied, layer_groups, embed_dim)
    block = 12 * n_embd * n_embd + 13 * n_embd
    return n - block * sum(1 for g in (layer_groups or []) if len(g) > 1)


def factorized_forgets_projection(vocab_size, block_size, n_layer, n_head, n_embd, tied=True,
                                  layer_groups=None, embed_dim=None):
    """Counts the (V, E) table but not the (E, H) projection."""
    n = counts.param_count(vocab_size, block_size, n_layer, n_head, n_embd, tied, layer_groups, embed_dim)
    return n if embed_dim is None else n - embed_dim * n_embd


# --- tying ------------------------------------------------------------------------------------------

class _DetachedHead(nn.Module):
    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.detach())  # the head reads the tensor but never trains it


def _grad(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lm_loss(model(idx), targets).backward()
    return model.wte.weight.grad


def head_use_detached(config, state, idx, targets):
    """One tensor, but the head's use is cut out of the graph: only the lookup's gradient arrives."""
    model = GPT.from_state({**config, "tie_embeddings": True}, state)
    model.lm_head = _DetachedHead(model.wte.weight)
    return _grad(model, idx, targets)


def tied_by_copy_at_init(config, state, idx, targets):
    """'Tied' by copying the values once: two tensors, so the embedding gets only the lookup's gradient."""
    model = GPT.from_state({**config, "tie_embeddings": True}, state)
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    return _grad(model, idx, targets)


def embedding_use_detached(config, state, idx, targets):
    """The lookup reads a detached view: only the head's gradient arrives."""
    model = GPT.from_state({**config, "tie_embeddings": True}, state)
    weight = model.wte.weight
    model.wte.forward = lambda ids: F.embedding(ids, weight.detach())
    return _grad(model, idx, targets)


# --- layer sharing and the KV cache ------------------------------------------------------------------

def shares_block_objects(config, state, groups, prompt, max_new_tokens):
    """Shares by putting the owner's Block object in every layer of its group: one KV-cache slot for all."""
    model = GPT.from_state(config, state)
    for group in groups:
        for i in group[1:]:
            model.blocks[i] = model.blocks[group[0]]
    return kv_fast.generate(model, prompt, max_new_tokens)


def shares_attention_modules(config, state, groups, prompt, max_new_tokens):
    """Shares the attention module itself (its ``layer`` index with it) and the rest by parameter."""
    from impl.weight_sharing.sharing import share_layers

    model = share_layers(GPT.from_state(config, state), groups)
    for group in groups:
        for i in group[1:]:
            model.blocks[i].attn = model.blocks[group[0]].attn
    return kv_fast.generate(model, prompt, max_new_tokens)
