"""Pruning masks as the papers state them: sort the scores, drop the lowest, one entry at a time.

A mask is a bool tensor shaped like its weight: True keeps the weight, False prunes it (sets it to 0).
``sparsity`` s in [0, 1] prunes exactly ``prune_count(n, s) = round(s * n)`` of the n weights a
comparison covers (Python's round, half to even: torch.nn.utils.prune's rule, so a fraction
means the same number of weights as there).

- magnitude (Zhu & Gupta 2017; Han et al. 2015): score |W|; ``scope="layer"`` compares within
  each matrix, ``scope="global"`` across all of them at once (one threshold for the whole model);
- Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input
  feature over every calibration token, compared within each output row (each row loses the same
  number of weights).

Ties: among equal scores the entry that comes first (flat index; for ``global`` the matrices in the
order given) is pruned first. Any order would meet the sparsity; this one is reproducible and it is
what a stable sort gives, so ``fast.py`` can match it exactly.
"""

from __future__ import annotations

import math

import torch


def prune_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights ``sparsity`` prunes: ``round(sparsity * n)``; a sparsity outside
    [0, 1] is an error."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return round(sparsity * n)


def _lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the ``k`` lowest scores, ties to the earlier index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]


def magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str = "layer") -> list[torch.Tensor]:
    """Keep-masks (bool, each shaped like its weight) pruning the smallest |w|: ``round(sparsity * n)``
    of each weight's n entries (``scope="layer"``) or of all entries together (``"global"``)."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    flat = [w.detach().abs().flatten().tolist() for w in weights]
    groups = [[i] for i in range(len(weights))] if scope == "layer" else [list(range(len(weights)))]
    keep = [[True] * len(f) for f in flat]
    for group in groups:
        entries = [(t, j) for t in group for j in range(len(flat[t]))]  # (tensor, flat index) in order
        scores = [flat[t][j] for t, j in entries]
        for e in _lowest(scores, prune_count(len(entries), sparsity)):
            t, j = entries[e]
            keep[t][j] = False
    return [torch.tensor(k, dtype=torch.bool).view(w.shape) for k, w in zip(keep, weights, strict=True)]


def input_norms(inputs: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` (in,) of a layer's inputs ``X`` (..., in) over every token, in float64."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return torch.tensor([math.sqrt(sum(v * v for v in x[:, j].tolist())) for j in range(x.shape[1])],
                        dtype=torch.float64)


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (out, in) float64, keep-mask (out, in) bool): ``|W_ij| * norms_j``, and in every row the
    ``round(sparsity * in)`` lowest scores pruned."""
    out_f, in_f = weight.shape
    w = weight.detach().double()
    scores = torch.empty(out_f, in_f, dtype=torch.float64)
    keep = torch.ones(out_f, in_f, dtype=torch.bool)
    k = prune_count(in_f, sparsity)
    for i in range(out_f):
        for j in range(in_f):
            scores[i, j] = abs(w[i, j].item()) * norms[j].item()
        for j in _lowest(scores[i].tolist(), k):
            keep[i, j] = False
    return scores, keep


def wanda(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Wanda on one layer from its calibration inputs ``X`` (n, in): ``{"scores", "mask"}``."""
    scores, mask = wanda_mask(weight, input_norms(inputs), sparsity)
    return {"scores": scores, "mask": mask}
