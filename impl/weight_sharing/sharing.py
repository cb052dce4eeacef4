"""Cross-layer parameter sharing (ALBERT, Lan et al. 2019): several blocks compute with one set of weights.

We share *parameters*, not ``Block`` objects. Each block keeps its own modules (and its own
``attn.layer`` index, hence its own slot in a KV cache: the keys of layer 3 are not the keys of
layer 0 even when both use the same weights, because their inputs differ); only the
``nn.Parameter`` objects are aliased to the group owner's. Putting one ``Block`` object in several
places of ``model.blocks`` would run the same weights too, but every use would write the same cache
slot: generation with a cache would then disagree with generation without one
(``tests/mutants/weight_sharing.py`` keeps that broken variant).

``model.parameters()`` yields each shared tensor once, so ``num_params``, the optimizer and gradient
clipping all see the reduced model; autograd sums the gradients of every use into the one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from impl.gpt.model import GPT
from impl.kv_cache import fast as kv_fast
from impl.kv_cache import naive as kv_naive


def layer_groups(n_layer: int, n_groups: int) -> list[list[int]]:
    """``n_groups`` contiguous groups of layers (ALBERT all-shared: ``n_groups = 1``; ``n_layer``: no sharing).

    ``layer_groups(6, 2) == [[0, 1, 2], [3, 4, 5]]``; the first groups take one extra layer when
    ``n_groups`` does not divide ``n_layer``."""
    if not 1 <= n_groups <= n_layer:
        raise ValueError(f"n_groups must be between 1 and n_layer = {n_layer}, got {n_groups}")
    size, extra = divmod(n_layer, n_groups)
    groups, start = [], 0
    for g in range(n_groups):
        end = start + size + (1 if g < extra else 0)
        groups.append(list(range(start, end)))
        start = end
    return groups


def _alias(block: nn.Module, owner: nn.Module) -> None:
    """Replace every parameter of ``block`` (recursively) by the owner's parameter of the same name."""
    owner_modules = dict(owner.named_modules())
    for name, module in block.named_modules():
        source = owner_modules.get(name)
        if source is None or type(source) is not type(module):
            raise ValueError(f"cannot share: submodule {name!r} differs between the blocks ({type(module).__name__})")
        for pname, param in list(module.named_parameters(recurse=False)):
            shared = getattr(source, pname)
            if shared.shape != param.shape:
                raise ValueError(f"cannot share {name}.{pname}: shapes {tuple(param.shape)} vs {tuple(shared.shape)}")
            setattr(module, pname, shared)  # nn.Module.__setattr__ registers the owner's Parameter here


def share_layers(model: GPT, groups: Sequence[Sequence[int]]) -> GPT:
    """Make the blocks of each group use the parameters of the group's first block; returns ``model``.

    ``groups`` lists layer indices (each at most once; layers in no group keep their own weights), e.g.
    ``[[0, 1, 2, 3]]`` (all-shared) or ``layer_groups(4, 2)``. The other blocks' own weights are dropped."""
    seen: set[int] = set()
    for group in groups:
        for i in group:
            if not 0 <= i < len(model.blocks):
                raise ValueError(f"layer {i} is out of range: the model has {len(model.blocks)} blocks")
            if i in seen:
                raise ValueError(f"layer {i} appears in more than one group: {list(map(list, groups))}")
            seen.add(i)
    for group in groups:
        owner = model.blocks[group[0]]
        for i in group[1:]:
            _alias(model.blocks[i], owner)
    return model


def sharing_groups(model: GPT) -> list[list[int]]:
    """The layers that use one set of weights, read off the parameters themselves (identity of the
    first parameter of each block), in layer order: ``[[0], [1], ...]`` for an unshared model."""
    groups: dict[int, list[int]] = {}
    for i, block in enumerate(model.blocks):
        groups.setdefault(id(next(block.parameters())), []).append(i)
    return list(groups.values())


def _shared_model(config: dict, state: dict[str, torch.Tensor], groups: Sequence[Sequence[int]]) -> GPT:
    return share_layers(GPT.from_state(config, state), groups)


def greedy_uncached(config: dict, state: dict[str, torch.Tensor], groups: list[list[int]], prompt: torch.Tensor,
                    max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, T + n) of ``prompt`` (B, T) by the GPT ``config``/``state`` with its layers
    shared as ``groups``, re-running the whole context at every step (no cache)."""
    return kv_naive.generate(_shared_model(config, state, groups), prompt, max_new_tokens)


def greedy_cached(config: dict, state: dict[str, torch.Tensor], groups: list[list[int]], prompt: torch.Tensor,
                  max_new_tokens: int) -> torch.Tensor:
    """``greedy_uncached``'s contract through project 8's KV cache (one slot per layer, shared or not)."""
    return kv_fast.generate(_shared_model(config, state, groups), prompt, max_new_tokens)
