"""Exit heads, confidence measures and the K/V of a layer that a token skipped.

An exit head reads the residual stream after block ``l`` (1-based, l < n_layer) and predicts the next
token through the model's own tied LM head:

    logits_l(h) = lm_head(LN_l(h + U_l gelu(D_l h)))

``LN_l`` is a LayerNorm of its own (initialised as the model's ``ln_f``), ``D_l`` (C -> r) and ``U_l``
(r -> C) a small residual adapter (``U_l`` starts at zero, so an untrained head is ``ln_f`` + head on an
intermediate state; r = 0: no adapter). The LM head itself is shared and frozen: a head adds
``2 C (r + 1) + r + C`` parameters, not ``C V``. After the last block the exit is the model's own
``head`` (``ln_f`` + LM head): exiting there is the full model.

Confidence of a next-token distribution p = softmax(logits) over V ids, all in [0, 1] so a threshold
above 1 never exits:

- ``max_prob``: max_v p_v (CALM's "softmax response" without the top-2 difference);
- ``margin``: p_(1) - p_(2), the top-2 difference (CALM's softmax response);
- ``entropy``: 1 - H(p) / log V (1: one id has all the mass, 0: uniform).

A token that exits after block ``e`` never runs blocks e+1..L, but later tokens attend to every
layer's keys/values at its position. CALM's method, used here: the exit state h_e is copied up as
the input of every skipped layer, and each skipped layer's K/V are computed from it
(``skipped_kv``), so the cache is full at every layer and position.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.gpt.model import GPT, Block

MEASURES = ("max_prob", "margin", "entropy")


class ExitHeads(nn.Module):
    """One exit head per intermediate layer 1..n_layer-1 (LayerNorm + optional rank-``rank`` adapter),
    read through the model's shared LM head."""

    def __init__(self, n_layer: int, n_embd: int, rank: int = 0):
        super().__init__()
        self.n_layer, self.rank = n_layer, rank
        self.norms = nn.ModuleList(nn.LayerNorm(n_embd) for _ in range(n_layer - 1))
        self.down = nn.ModuleList(nn.Linear(n_embd, rank) for _ in range(n_layer - 1 if rank else 0))
        self.up = nn.ModuleList(nn.Linear(rank, n_embd) for _ in range(n_layer - 1 if rank else 0))
        for lin in self.up:  # zero: an untrained head is LayerNorm + the LM head
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @classmethod
    def for_model(cls, model: GPT, rank: int = 0) -> ExitHeads:
        """Heads for ``model``, every LayerNorm starting as the model's ``ln_f``, in its dtype and device."""
        heads = cls(model.config.n_layer, model.config.n_embd, rank)
        with torch.no_grad():
            for norm in heads.norms:
                norm.weight.copy_(model.ln_f.weight)
                if model.ln_f.bias is not None:
                    norm.bias.copy_(model.ln_f.bias)
        p = model.lm_head.weight
        return heads.to(dtype=p.dtype, device=p.device)

    def features(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The normalised state (..., C) head ``layer`` (1 .. n_layer-1) feeds to the LM head."""
        i = layer - 1
        if self.rank:
            h = h + self.up[i](F.gelu(self.down[i](h)))
        return self.norms[i](h)

    def logits(self, layer: int, h: torch.Tensor, model: GPT) -> torch.Tensor:
        """Next-token logits (..., V) from the state ``h`` (..., C) after block ``layer`` (1-based);
        ``layer == n_layer`` is the model's own head."""
        if layer == self.n_layer:
            return model.head(h)
        return model.lm_head(self.features(layer, h))


def confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Confidence in [0, 1] of each distribution softmax(logits) (..., V) -> (...) (see the module
    docstring for the three measures)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return logp.max(dim=-1).values.exp()
    if measure == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    if measure == "entropy":
        entropy = -(logp.exp() * logp).sum(dim=-1)
        return 1.0 - entropy / math.log(logits.shape[-1])
    raise ValueError(f"unknown confidence measure {measure!r}; known: {', '.join(MEASURES)}")


def layer_kv(block: Block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, nh, T, hs) that ``block``'s attention computes from its input ``h`` (B, T, C):
    what a skipped layer stores for a token whose exit state is copied up to it."""
    attn = block.attn
    B, T, _ = h.shape
    _, k, v = attn.c_attn(block.ln_1(h)).chunk(3, dim=2)  # each (B, T, nh * hs)
    # (B, T, nh * hs) -> (B, nh, T, hs)
    return (k.reshape(B, T, -1, attn.head_dim).transpose(1, 2), v.reshape(B, T, -1, attn.head_dim).transpose(1, 2))


def heads_from_state(n_layer: int, n_embd: int, state: dict[str, torch.Tensor]) -> ExitHeads:
    """``ExitHeads`` holding ``state`` (its adapter rank read from the state), in eval mode."""
    rank = state["down.0.weight"].shape[0] if "down.0.weight" in state else 0
    heads = ExitHeads(n_layer, n_embd, rank)
    heads.load_state_dict(state)
    return heads.to(dtype=next(iter(state.values())).dtype).eval()
