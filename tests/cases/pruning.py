"""Cases and properties for project 17: weights to prune (tie-free for the torch peer, tied for the
exact-count property), Wanda's hand examples, small GPTs with heads and neurons to remove, and a tiny
masked fine-tuning run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.train.loop import TrainConfig
from tests.cases.gpt import random_gpt

# ------------------------------------------------------------------ magnitude masks


def weights_case(seed: int, shapes: list[tuple[int, ...]], sparsity: float, scope: str, ties: bool = False,
                 id: str | None = None) -> dict[str, Any]:
    """Random weights of ``shapes`` (normal: no two magnitudes equal; ``ties``: small integers, many equal)."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        weights = [torch.randint(-3, 4, s, generator=gen).float() for s in shapes]
    else:
        weights = [torch.randn(s, generator=gen) for s in shapes]
    case = {"weights": weights, "sparsity": sparsity, "scope": scope}
    return case | ({"id": id} if id else {})


_SHAPE_LISTS = st.lists(st.sampled_from([(1, 1), (3, 5), (4, 8), (8, 4), (16, 16), (5,), (2, 3, 4)]),
                        min_size=1, max_size=4)
_SPARSITY = st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0])

magnitude_weights = Cases(
    edge=[
        weights_case(0, [(8, 16)], 0.5, "layer", id="one-matrix-half"),
        weights_case(1, [(6,)], 0.25, "layer", id="1.5-rounds-to-2"),
        weights_case(2, [(10,)], 0.25, "layer", id="2.5-rounds-half-to-even"),
        weights_case(3, [(4, 8), (16, 16), (3, 5)], 0.7, "layer", id="three-layers-70pc"),
        weights_case(4, [(4, 8), (16, 16), (3, 5)], 0.7, "global", id="global-70pc"),
        weights_case(5, [(8, 8)], 0.0, "global", id="nothing-pruned"),
        weights_case(6, [(8, 8), (2, 2)], 1.0, "layer", id="everything-pruned"),
        weights_case(7, [(32, 64), (64, 32)], 0.5, "global", id="global-half"),
    ],
    strategy=st.builds(weights_case, seed=st.integers(0, 2**16), shapes=_SHAPE_LISTS, sparsity=_SPARSITY,
                       scope=st.sampled_from(["layer", "global"])),
)

tied_weights = Cases(
    edge=[
        weights_case(10, [(8, 16)], 0.5, "layer", ties=True, id="integers-half"),
        weights_case(11, [(4, 8), (16, 16)], 0.3, "global", ties=True, id="integers-global"),
        {"weights": [torch.zeros(4, 4)], "sparsity": 0.5, "scope": "layer", "id": "all-zero"},
        {"weights": [torch.ones(3, 7), -torch.ones(5)], "sparsity": 0.4, "scope": "global", "id": "all-equal"},
        weights_case(12, [(6,)], 0.25, "layer", ties=True, id="1.5-rounds-to-2-ties"),
    ],
    strategy=st.builds(weights_case, seed=st.integers(0, 2**16), shapes=_SHAPE_LISTS, sparsity=_SPARSITY,
                       scope=st.sampled_from(["layer", "global"]), ties=st.booleans()),
)


def meets_sparsity_exactly(fn: Callable, weights: list[torch.Tensor], sparsity: float, scope: str) -> None:
    """Property: exactly ``round(sparsity * n)`` weights are pruned per matrix (``layer``) or over all
    (``global``), and no pruned |w| exceeds a kept |w| of the same comparison group."""
    masks = fn(weights, sparsity, scope)
    assert [m.shape for m in masks] == [w.shape for w in weights], "a mask's shape differs from its weight's"
    assert all(m.dtype == torch.bool for m in masks), "masks must be bool (True keeps)"
    groups = [[i] for i in range(len(weights))] if scope == "layer" else [list(range(len(weights)))]
    for group in groups:
        mags = torch.cat([weights[i].abs().flatten() for i in group])
        keep = torch.cat([masks[i].flatten() for i in group])
        want = round(sparsity * mags.numel())
        assert int((~keep).sum()) == want, f"pruned {int((~keep).sum())} of {mags.numel()}, asked {want}"
        if 0 < want < mags.numel():
            assert mags[~keep].max() <= mags[keep].min(), "a pruned weight is larger than a kept one"


# ------------------------------------------------------------------ Wanda


def _hand(weight, inputs, sparsity, scores, mask, id):
    # the hand-computed scores as the fp32 numbers they are (0.1 is not exact in binary)
    return {"weight": torch.tensor(weight, dtype=torch.float32), "inputs": torch.tensor(inputs, dtype=torch.float32),
            "sparsity": sparsity, "expected_scores": torch.tensor(scores, dtype=torch.float32).double(),
            "expected_mask": torch.tensor(mask),
            "id": id}


# input feature norms ||X_j||: sqrt(3^2 + 4^2) = 5, sqrt(0 + 2^2) = 2, 1, 0.5
_X = [[3.0, 0.0, 1.0, 0.0], [4.0, 2.0, 0.0, 0.5]]


def wanda_case(seed: int, rows: int, cols: int, n_tokens: int, sparsity: float) -> dict[str, Any]:
    """Random weight and calibration inputs whose features have very different scales (as LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(2 * torch.randn(cols, generator=gen))
    return {"weight": torch.randn(rows, cols, generator=gen),
            "inputs": torch.randn(n_tokens, cols, generator=gen) * scale, "sparsity": sparsity}


wanda_layers = Cases(
    edge=[
        # row 0: scores 1*5, 4*2, 2*1, 8*0.5 = 5, 8, 2, 4 -> prune cols 2, 3 (|W| alone would prune 0, 2)
        # row 1: scores 2*5, 1*2, 6*1, 3*0.5 = 10, 2, 6, 1.5 -> prune cols 1, 3 (|W| alone: 0, 1)
        _hand([[1.0, -4.0, 2.0, 8.0], [-2.0, 1.0, 6.0, 3.0]], _X, 0.5,
              [[5, 8, 2, 4], [10, 2, 6, 1.5]], [[True, True, False, False], [True, False, True, False]],
              id="hand-example"),
        # unit norms; row 0 is small everywhere: a per-layer comparison would empty it, per row each loses 2
        _hand([[0.1, 0.2, -0.3, 0.4], [1.0, -2.0, 3.0, 4.0]], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                               [0, 0, 0, 1]], 0.5,
              [[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]], [[False, False, True, True], [False, False, True, True]],
              id="per-row-not-per-layer"),
        # 3 of 4 columns pruned per row: 0.75 * 4 = 3
        _hand([[1.0, -4.0, 2.0, 8.0], [-2.0, 1.0, 6.0, 3.0]], _X, 0.75,
              [[5, 8, 2, 4], [10, 2, 6, 1.5]], [[False, True, False, False], [True, False, False, False]],
              id="hand-example-75pc"),
        wanda_case(0, 16, 32, 64, 0.5) | {"id": "random-half"},
    ],
    strategy=st.builds(wanda_case, seed=st.integers(0, 2**16), rows=st.integers(1, 12), cols=st.integers(1, 40),
                       n_tokens=st.integers(1, 50), sparsity=_SPARSITY),
)


def wanda_formula(fn: Callable, weight: torch.Tensor, inputs: torch.Tensor, sparsity: float,
                  expected_scores: torch.Tensor | None = None, expected_mask: torch.Tensor | None = None) -> None:
    """Property: scores are ``|W_ij| * ||X_j||_2`` (the hand example's numbers where given), and every row
    prunes exactly ``round(sparsity * in)`` of its lowest scores (the hand example's mask where given)."""
    out = fn(weight, inputs, sparsity)
    formula = weight.double().abs() * inputs.double().pow(2).sum(dim=0).sqrt()[None, :]
    assert torch.allclose(out["scores"].double(), formula, rtol=1e-12, atol=0), \
        f"scores differ from |W| * ||X||_2 by up to {(out['scores'].double() - formula).abs().max().item():.3g}"
    if expected_scores is not None:
        assert torch.allclose(out["scores"].double(), expected_scores, rtol=1e-12, atol=0), \
            f"scores {out['scores'].tolist()} are not the hand-computed {expected_scores.tolist()}"
    mask = out["mask"]
    want = round(sparsity * weight.shape[1])
    pruned = (~mask).sum(dim=1)
    assert (pruned == want).all(), f"rows prune {pruned.tolist()} weights, each should prune {want}"
    for i in range(weight.shape[0]):
        if 0 < want < weight.shape[1]:
            assert formula[i][~mask[i]].max() <= formula[i][mask[i]].min(), f"row {i} prunes a higher score"
    if expected_mask is not None:
        assert torch.equal(mask, expected_mask), f"mask {mask.tolist()} is not the hand-worked {expected_mask.tolist()}"


# ------------------------------------------------------------------ structured


def structured_case(seed: int, n_layer: int, n_head: int, head_dim: int, batch: int, length: int,
                    bias: bool = True, id: str | None = None) -> dict[str, Any]:
    """A random GPT, tokens, and per layer a random non-empty set of heads and of MLP neurons to keep
    (drawn so they are rarely a prefix: a slicing error shows)."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, 40, max(length, 8), bias)
    gen = torch.Generator().manual_seed(seed + 1)
    # GPT init zeroes biases; give them values, or a bias sliced wrong would go unseen
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if k.endswith(".bias") else v for k, v in state.items()}
    hidden = 4 * n_head * head_dim

    def some(n: int) -> list[int]:
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    idx = torch.randint(40, (batch, length), generator=gen)
    case = {"config": config, "state": state, "idx": idx,
            "heads": [some(n_head) for _ in range(n_layer)], "neurons": [some(hidden) for _ in range(n_layer)]}
    return case | ({"id": id} if id else {})


structured_models = Cases(
    edge=[
        structured_case(0, 2, 4, 8, 2, 12, id="2-layers-4-heads"),
        structured_case(1, 1, 6, 4, 1, 20, id="6-heads-one-layer"),
        structured_case(2, 3, 2, 16, 2, 9, bias=False, id="no-bias"),
        {**structured_case(3, 2, 4, 8, 2, 10), "heads": [[1, 3], [2]], "neurons": [[0, 5, 77, 127], [64]],
         "id": "hand-picked-keep-sets"},
    ],
    strategy=st.builds(structured_case, seed=st.integers(0, 2**16), n_layer=st.integers(1, 3),
                       n_head=st.integers(1, 6), head_dim=st.sampled_from([2, 4, 8]), batch=st.integers(1, 3),
                       length=st.integers(1, 16), bias=st.booleans()),
)

# ------------------------------------------------------------------ masked fine-tuning

_TOKENS = np.random.default_rng(0).integers(0, 32, 2000).astype(np.uint16)


def finetune_case(seed: int, sparsity: float, steps: int, id: str | None = None) -> dict[str, Any]:
    """A tiny GPT, token data and a short fine-tuning config."""
    config, state = random_gpt(seed, 2, 2, 8, 32, 16)
    cfg = TrainConfig(max_iters=steps, lr_decay_iters=steps, warmup_iters=1, batch_size=4, block_size=16,
                      eval_interval=10**6, eval_iters=1, learning_rate=3e-3, seed=seed)
    case = {"config": config, "state": state, "tokens": _TOKENS, "sparsity": sparsity, "cfg": cfg}
    return case | ({"id": id} if id else {})


finetune_runs = Cases(
    edge=[finetune_case(0, 0.5, 4, id="half-4-steps"), finetune_case(1, 0.9, 3, id="90pc-3-steps")],
    strategy=st.builds(finetune_case, seed=st.integers(0, 2**16), sparsity=st.sampled_from([0.2, 0.5, 0.8]),
                       steps=st.integers(2, 4)),
)


def pruned_weights_stay_zero(fn: Callable, config: dict, state: dict, tokens: np.ndarray, sparsity: float,
                             cfg: TrainConfig) -> None:
    """Property: while ``fn(model, masks, train, val, cfg)`` fine-tunes a magnitude-pruned GPT, every
    forward of every masked layer sees its pruned weights at exactly 0; afterwards they are 0 and the kept
    weights have moved (it did train)."""
    from impl.gpt.model import GPT
    from impl.pruning.unstructured import magnitude_model_masks

    model = GPT.from_state(config, state).train()
    masks = magnitude_model_masks(model, sparsity)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    leaked: list[float] = []
    hooks = []
    for name, keep in masks.items():
        def check(module, _args, keep=keep):
            leaked.append(module.weight.detach()[~keep].abs().max().item() if (~keep).any() else 0.0)
        hooks.append(model.get_submodule(name).register_forward_pre_hook(check))
    fn(model, masks, tokens, tokens, cfg)
    for h in hooks:
        h.remove()
    assert leaked, "no forward of a masked layer ran"
    assert max(leaked) == 0.0, (f"{sum(v > 0 for v in leaked)} of {len(leaked)} forwards saw a pruned weight "
                                f"that was not 0 (up to {max(leaked):.3g})")
    moved = False
    for name, keep in masks.items():
        w = model.get_submodule(name).weight.detach()
        assert not w[~keep].any(), f"{name}: pruned weights are not 0 after fine-tuning"
        moved |= not torch.equal(w[keep], before[name][keep])
    assert moved, "no kept weight changed: nothing was fine-tuned"
