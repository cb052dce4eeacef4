"""Mutants of project 1's forward pass: each must be rejected by a check of specs/01."""

import torch

from tests.mutants.gpt import model_with


@torch.no_grad()
def no_causal_mask(config, state, idx):
    return model_with(config, state, attention="mutant_no_causal_mask")(idx)


@torch.no_grad()
def wrong_softmax_scale(config, state, idx):
    return model_with(config, state, attention="mutant_wrong_scale")(idx)


@torch.no_grad()
def exact_gelu(config, state, idx):
    return model_with(config, state, exact_gelu=True)(idx)
