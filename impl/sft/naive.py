"""Supervised fine-tuning loss, the readable way: one example at a time, no padding, no packing.

Each example runs alone through the model; the loss adds the cross-entropy of every trained target
(prompt tokens are ``IGNORE_INDEX`` and skipped) and divides by how many there were. ``impl.sft.fast``
must give the same number from one padded or packed batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from impl.sft.fast import Example, loss_and_grad
from impl.sft.templates import IGNORE_INDEX


def example_loss_sum(model: torch.nn.Module, example: Example) -> tuple[torch.Tensor, int]:
    """(sum of the cross-entropies of ``example``'s trained targets, how many there are)."""
    logits = model(torch.tensor([example.inputs]))[0].float()  # (T, V)
    targets = torch.tensor(example.targets)
    keep = targets != IGNORE_INDEX
    total = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    return total, int(keep.sum())


def sft_loss(model: torch.nn.Module, examples: Sequence[Example], pack: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over every trained target of ``examples``, computed example by example
    (``pack`` is accepted for the fast version's signature and ignored: nothing is packed here)."""
    total, count = torch.zeros(()), 0
    for ex in examples:
        s, n = example_loss_sum(model, ex)
        total, count = total + s, count + n
    if count == 0:
        raise ValueError("no trained targets in these examples (every label is masked)")
    return total / count


def hand_loss(model: torch.nn.Module, examples: Sequence[Example], pack: int | None = None) -> torch.Tensor:
    """The same mean written out position by position: ``-(z[y] - log sum_j exp z[j])`` with the
    log-sum-exp shifted by the row maximum, over every trained target, divided by their count."""
    terms = []
    for ex in examples:
        logits = model(torch.tensor([ex.inputs]))[0].float()
        for i, y in enumerate(ex.targets):
            if y == IGNORE_INDEX:
                continue
            z = logits[i]
            top = z.max().detach()
            terms.append(-(z[y] - (top + torch.log(torch.exp(z - top).sum()))))
    if not terms:
        raise ValueError("no trained targets in these examples (every label is masked)")
    return torch.stack(terms).sum() / len(terms)


def per_example(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
                pack: int | None = None) -> dict[str, torch.Tensor]:
    """Loss and token-embedding gradient of ``examples`` run one at a time (``pack`` unused)."""
    return loss_and_grad(config, state, examples, sft_loss)


def by_hand(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
            pack: int | None = None) -> dict[str, torch.Tensor]:
    """Loss and token-embedding gradient from ``hand_loss``."""
    return loss_and_grad(config, state, examples, hand_loss)
