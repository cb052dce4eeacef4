"""Broken attention and MLP variants of the shared GPT, for mutants of several projects."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from impl.gpt.attention import naive_attention, register_attention
from impl.gpt.model import GPT


def _no_causal_mask(q, k, v, causal):
    return naive_attention(q, k, v, causal=False)


def _wrong_scale(q, k, v, causal):
    return naive_attention(q * math.sqrt(q.shape[-1]), k, v, causal)  # scores / 1 instead of / sqrt(hs)


register_attention("mutant_no_causal_mask", _no_causal_mask)
register_attention("mutant_wrong_scale", _wrong_scale)


def model_with(config: dict, state: dict[str, torch.Tensor], attention: str = "sdpa",
               exact_gelu: bool = False) -> GPT:
    """The GPT of ``config``/``state`` with a broken attention backend or erf-GELU MLP."""
    model = GPT.from_state(config, state, attention=attention)
    if exact_gelu:
        for block in model.blocks:
            block.mlp.gelu = nn.GELU()  # erf GELU: not GPT-2's tanh approximation
    return model
