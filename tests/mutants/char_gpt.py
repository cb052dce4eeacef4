"""Mutants of project 1's forward pass: each must be rejected by a check of specs/01."""

import torch

from impl.gpt.model import GPT
from tests.mutants.gpt import LostOffsetGPT, model_with


@torch.no_grad()
def no_causal_mask(config, state, idx):
    return model_with(config, state, attention="mutant_no_causal_mask")(idx)


@torch.no_grad()
def wrong_softmax_scale(config, state, idx):
    return model_with(config, state, attention="mutant_wrong_scale")(idx)


@torch.no_grad()
def exact_gelu(config, state, idx):
    return model_with(config, state, exact_gelu=True)(idx)


@torch.no_grad()
def sees_padding(config, state, idx, attention_mask):
    """A mask that lets a row see padding: the backend drops ``key_valid``."""
    return model_with(config, state, attention="mutant_sees_padding")(idx, attention_mask=attention_mask)


@torch.no_grad()
def padding_query_sees_nothing(config, state, idx, attention_mask):
    """Padding hidden from every query, its own padding too: left padding softmaxes over nothing."""
    return model_with(config, state, attention="mutant_padding_query_sees_nothing")(idx, attention_mask=attention_mask)


@torch.no_grad()
def position_offset_lost_on_one_row(config, state, idx, attention_mask):
    """The most padded row counts positions from its first slot, not from its first real token."""
    return LostOffsetGPT.from_state(config, state)(idx, attention_mask=attention_mask)


@torch.no_grad()
def hidden_states_shifted_by_one_layer(config, state, idx):
    """Each hidden state reported one layer late: the embeddings are lost, the last one repeats."""
    model = GPT.from_state(config, state)
    states = model.hidden_states(idx)
    states = states[1:] + states[-1:]
    return states[:-1] + [model.ln_f(states[-1])]
