"""Broken attention and MLP variants of the shared GPT, for mutants of several projects."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from impl.gpt.attention import naive_attention, register_attention
from impl.gpt.model import GPT


def _no_causal_mask(q, k, v, causal, key_valid=None):
    return naive_attention(q, k, v, False, key_valid)


def _wrong_scale(q, k, v, causal, key_valid=None):
    return naive_attention(q * math.sqrt(q.shape[-1]), k, v, causal, key_valid)  # scores / 1, not / sqrt(hs)


def _sees_padding(q, k, v, causal, key_valid=None):
    return naive_attention(q, k, v, causal)  # key_valid dropped: every row also attends to padding keys


register_attention("mutant_no_causal_mask", _no_causal_mask)
register_attention("mutant_wrong_scale", _wrong_scale)
register_attention("mutant_sees_padding", _sees_padding)


def model_with(config: dict, state: dict[str, torch.Tensor], attention: str = "sdpa",
               exact_gelu: bool = False) -> GPT:
    """The GPT of ``config``/``state`` with a broken attention backend or erf-GELU MLP."""
    model = GPT.from_state(config, state, attention=attention)
    if exact_gelu:
        for block in model.blocks:
            block.mlp.gelu = nn.GELU()  # erf GELU: not GPT-2's tanh approximation
    return model


def _padding_query_sees_nothing(q, k, v, causal, key_valid=None):
    """Padding hidden without the rule's exception: a left-padding query sees no key at all."""
    if key_valid is None:
        return naive_attention(q, k, v, causal)
    T, S = q.shape[2], k.shape[2]
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else torch.ones(T, S, dtype=torch.bool)
    mask = allowed & key_valid[:, None, None, :].bool()  # (B, 1, T, S)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # a row of -inf everywhere: softmax over nothing is NaN


register_attention("mutant_padding_query_sees_nothing", _padding_query_sees_nothing)


class LostOffsetGPT(GPT):
    """The GPT whose position ids for a padded batch are right except on the most padded row, which
    counts slots (its left-padding offset lost): its first real token sits at the number of pads, not
    at 0. Through a KV cache too: every later step of that row stays shifted."""

    def positions(self, idx: torch.Tensor, start: int = 0,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        position_ids = super().positions(idx, start, attention_mask)
        if attention_mask is None:
            return position_ids
        position_ids = position_ids.clone()
        row = (attention_mask == 0).sum(dim=1).argmax()
        position_ids[row] = torch.arange(start, start + idx.shape[1], device=idx.device)
        return position_ids
