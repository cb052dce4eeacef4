"""The pruning masks of ``naive.py``, vectorized: one stable sort per comparison group instead of a
Python sort of (score, index) pairs. Same signatures, same masks bit for bit (ties included)."""

from __future__ import annotations

import torch

from impl.pruning.naive import prune_count


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim of ``scores`` (..., n) with the ``k`` lowest of every row pruned;
    a stable sort sends ties to the earlier index first, as naive.py's key (score, index) does."""
    order = torch.argsort(scores, dim=-1, stable=True)[..., :k]
    keep = torch.ones_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, order, False)


def magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str = "layer") -> list[torch.Tensor]:
    """Keep-masks pruning the smallest |w| per weight (``scope="layer"``) or over all weights at once
    (``"global"``); see ``naive.magnitude_masks``."""
    if scope == "layer":
        return [_prune_lowest(w.detach().abs().flatten(), prune_count(w.numel(), sparsity)).view(w.shape)
                for w in weights]
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    # global: one sort over the concatenation, in the order given (the tie rule), then split back
    flat = torch.cat([w.detach().abs().flatten().to(torch.float64) for w in weights])
    keep = _prune_lowest(flat, prune_count(flat.numel(), sparsity))
    return [k.view(w.shape) for k, w in zip(keep.split([w.numel() for w in weights]), weights, strict=True)]


def input_norms(inputs: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` (in,) of inputs ``X`` (..., in) over every token, float64."""
    return inputs.reshape(-1, inputs.shape[-1]).double().square().sum(dim=0).sqrt()


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (out, in) float64, keep-mask (out, in)): ``|W| * norms`` broadcast over rows, the
    ``round(sparsity * in)`` lowest of each row pruned (Wanda compares per output)."""
    scores = weight.detach().double().abs() * norms.double()[None, :]  # (out, in)
    return scores, _prune_lowest(scores, prune_count(weight.shape[1], sparsity))


def wanda(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float) -> dict[str, torch.Tensor]:
    """Wanda on one layer from its calibration inputs ``X`` (n, in): ``{"scores", "mask"}``."""
    scores, mask = wanda_mask(weight, input_norms(inputs), sparsity)
    return {"scores": scores, "mask": mask}
