"""Unstructured pruning of a GPT's block linears: masks for the whole model, masked fine-tuning with
the shared loop, and iterative pruning (prune a little, fine-tune, prune more).

    masks = magnitude_model_masks(model, 0.5, scope="layer")       # or "global"
    masks = wanda_model_masks(model, calibration_batches(train_ids), 0.5)
    apply_masks(model, masks)                                       # weights zeroed in place
    finetune_masked(model, masks, train_ids, val_ids, TrainConfig(...))
    iterative_prune(model, "magnitude", 0.7, steps=3, train_ids=..., val_ids=..., cfg=...)

Masks (bool, True keeps) are keyed by module name (``impl.ptq.modules.linear_names``: every
``c_attn``, ``c_proj``, ``c_fc`` of the blocks). The tied embedding / LM head is not pruned: a zero in
it would remove a token's embedding and its logit at once. Fine-tuning keeps the pruned weights at
zero by a parametrization (``torch.nn.utils.parametrize``): the layer's weight is ``original * mask``
in every forward, so no optimizer step can revive a pruned weight, and the gradient of a pruned entry
is exactly 0. Afterwards the product is written back as a plain weight.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from impl.pruning import fast
from impl.ptq.calibration import block_by_block
from impl.ptq.modules import TARGETS, linear_names
from impl.train.loop import TrainConfig, TrainResult, train

Masks = dict[str, torch.Tensor]


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The block linears pruning addresses, by module name, in module order."""
    return {name: model.get_submodule(name) for name in linear_names(model, TARGETS)}


def magnitude_model_masks(model: nn.Module, sparsity: float, scope: str = "layer") -> Masks:
    """Magnitude keep-masks for every block linear: ``scope="layer"`` prunes ``sparsity`` of each
    matrix, ``"global"`` prunes ``sparsity`` of all of them together (layers end up unequal)."""
    layers = block_linears(model)
    masks = fast.magnitude_masks([m.weight for m in layers.values()], sparsity, scope)
    return dict(zip(layers, masks, strict=True))


class _SquaredNorms:
    """Running sum over calibration tokens of each input feature's square (float64): ||X_j||_2^2."""

    def __init__(self, layer: nn.Linear):
        self.total = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)

    def add(self, x: torch.Tensor) -> None:
        self.total += x.detach().reshape(-1, x.shape[-1]).double().square().sum(dim=0)


@torch.no_grad()
def wanda_model_masks(model: nn.Module, calib_batches: torch.Tensor, sparsity: float, batch_size: int = 16) -> Masks:
    """Wanda keep-masks for every block linear from calibration windows ``calib_batches`` (n, T) ids.

    Block by block, as the paper's code does: a block's input norms are taken on the outputs of the
    blocks already pruned, so later layers are scored on the activations they will actually see.
    ``model`` is not modified (a copy is)."""
    masks: Masks = {}
    for prefix, layers, sq in block_by_block(model, calib_batches, _SquaredNorms, TARGETS, batch_size=batch_size):
        for name, m in layers.items():
            _, keep = fast.wanda_mask(m.weight, sq[name].total.sqrt(), sparsity)
            m.weight.mul_(keep)
            masks[prefix + name] = keep
    return masks


class _KeepMask(nn.Module):
    """Parametrization ``weight = original * mask``: pruned entries read 0 and get gradient 0."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights of ``model`` in place (plain weights, no hook)."""
    for name, keep in masks.items():
        model.get_submodule(name).weight.mul_(keep.to(model.get_submodule(name).weight.device))


def finetune_masked(model: nn.Module, masks: Masks, train_ids: np.ndarray, val_ids: np.ndarray,
                    cfg: TrainConfig) -> TrainResult:
    """Fine-tune ``model`` with the shared loop while every pruned weight stays exactly 0 (in every
    forward, not only at the end); returns the loop's result. ``model`` ends with plain weights."""
    apply_masks(model, masks)
    for name, keep in masks.items():
        layer = model.get_submodule(name)
        parametrize.register_parametrization(layer, "weight", _KeepMask(keep.to(layer.weight.device)))
    try:
        return train(model, train_ids, val_ids, cfg, progress=False)
    finally:
        for name in masks:
            parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)


def cubic_schedule(final_sparsity: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` pruning steps: Zhu & Gupta's ``s_f (1 - (1 - t/n)^3)``, fast
    at first (many redundant weights) and gently at the end."""
    return [final_sparsity * (1 - (1 - t / steps) ** 3) for t in range(1, steps + 1)]


def model_masks(model: nn.Module, method: str, sparsity: float, calib_batches: torch.Tensor | None = None) -> Masks:
    """Keep-masks of ``method``: ``magnitude`` (per layer), ``magnitude-global`` or ``wanda`` (needs
    ``calib_batches``)."""
    if method == "magnitude":
        return magnitude_model_masks(model, sparsity, "layer")
    if method == "magnitude-global":
        return magnitude_model_masks(model, sparsity, "global")
    if method == "wanda":
        if calib_batches is None:
            raise ValueError("wanda needs calib_batches (windows of the training split)")
        return wanda_model_masks(model, calib_batches, sparsity)
    raise ValueError(f"unknown pruning method {method!r}; known: magnitude, magnitude-global, wanda")


def iterative_prune(model: nn.Module, method: str, final_sparsity: float, steps: int, train_ids: np.ndarray,
                    val_ids: np.ndarray, cfg: TrainConfig, calib_batches: torch.Tensor | None = None) -> list[dict]:
    """Prune to ``final_sparsity`` in ``steps`` steps (``cubic_schedule``), fine-tuning ``cfg`` (each step
    its own run of ``cfg.max_iters``) after each; weights pruned once stay pruned (each step's scores
    are taken on the already-masked weights, whose zeros score lowest). Returns one row per step."""
    rows = []
    for t, sparsity in enumerate(cubic_schedule(final_sparsity, steps)):
        masks = model_masks(model, method, sparsity, calib_batches)
        result = finetune_masked(model, masks, train_ids, val_ids, cfg)
        rows.append({"step": t + 1, "sparsity": sparsity, "train_wall_s": result.wall_s})
    return rows


def sparsity_of(model: nn.Module) -> float:
    """Fraction of the block linears' weights that are exactly 0."""
    weights = [m.weight for m in block_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
