"""Peer for magnitude pruning: ``torch.nn.utils.prune``'s ``l1_unstructured`` (one tensor) and
``global_unstructured`` with ``L1Unstructured`` (all tensors at once), read back as the bool keep-masks
``impl.pruning`` returns. Shares no code with ``impl.pruning``.

torch prunes ``round(amount * n)`` entries with ``torch.topk(|w|, k, largest=False)``; which of several
equal magnitudes it picks is not specified, so this peer is compared on weights without ties."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import prune


def _holders(weights: list[torch.Tensor]) -> list[nn.Module]:
    mods = []
    for w in weights:
        m = nn.Module()
        m.weight = nn.Parameter(w.detach().clone())
        mods.append(m)
    return mods


def magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str = "layer") -> list[torch.Tensor]:
    """Keep-masks (bool, shaped like each weight) torch's L1 pruning gives at ``amount = sparsity``:
    per tensor (``scope="layer"``) or global."""
    mods = _holders(weights)
    if scope == "layer":
        for m in mods:
            prune.l1_unstructured(m, "weight", amount=sparsity)
    elif scope == "global":
        prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured,
                                  amount=sparsity)
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return [m.weight_mask.bool() for m in mods]
