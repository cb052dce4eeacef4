"""Mutants of project 4's fine-tuning loss: each breaks one thing the checks must notice."""

from __future__ import annotations

import torch

from impl.sft import fast
from impl.sft.templates import IGNORE_INDEX


def packing_leaks_across_examples(config, state, examples, pack):
    """Packs the examples but gives every one of them the same segment id: they attend to each other."""
    def loss(model, exs):
        idx, targets, kw = fast.pack_rows(exs, pack)
        return fast.batch_loss(model, (idx, targets, {"segment_ids": (kw["segment_ids"] > 0).long()}))
    return fast.loss_and_grad(config, state, examples, loss)


def positions_run_on_in_packed_rows(config, state, examples, pack):
    """Keeps examples apart in attention but numbers positions across the whole row (no restart)."""
    def loss(model, exs):
        idx, targets, kw = fast.pack_rows(exs, pack)
        positions = torch.arange(idx.shape[1]).expand_as(idx)
        return fast.batch_loss(model, (idx, targets, {**kw, "position_ids": positions}))
    return fast.loss_and_grad(config, state, examples, loss)


def prompt_tokens_trained(config, state, examples, pack):
    """Trains every target, prompt included (the mask is lost): targets become the next input token."""
    def loss(model, exs):
        full = [fast.Example(e.inputs, (*e.inputs[1:], e.targets[-1] if e.targets[-1] != IGNORE_INDEX else 0))
                for e in exs]
        return fast.sft_loss(model, full, pack)
    return fast.loss_and_grad(config, state, examples, loss)


def shifted_after_packing(config, state, examples, pack):
    """Packs first and shifts the row after: an example's last input is scored on the next example's
    first token, and each example loses its own last target."""
    def loss(model, exs):
        idx, targets, kw = fast.pack_rows(exs, pack)
        wrong = torch.full_like(targets, IGNORE_INDEX)
        wrong[:, :-1] = targets[:, 1:]
        return fast.batch_loss(model, (idx, wrong, kw))
    return fast.loss_and_grad(config, state, examples, loss)


def mean_of_example_means(config, state, examples, pack):
    """Averages per-example mean losses instead of every trained token: long answers count too little."""
    def loss(model, exs):
        return torch.stack([fast.sft_loss(model, [e]) for e in exs]).mean()
    return fast.loss_and_grad(config, state, examples, loss)
