"""Structured pruning of a GPT: whole attention heads and MLP neurons removed, the matrices shrunk.

Importance of a structure = the energy it adds to the residual stream on calibration tokens: the
squared norm of its share of the output projection's result, summed over tokens. With ``Y`` (n, d) the
inputs of a ``c_proj`` (n tokens) and ``W`` its weight (C, d), the columns ``S`` of one head add
``Y_S W_S^T`` to the residual, so

    importance(head)   = sum_t ||W_S y_S,t||^2 = sum((W_S G_SS) * W_S),   G = Y^T Y   (hs x hs blocks)
    importance(neuron) = ||W_:,j||^2 * sum_t y_j,t^2                       (S = {j}: Wanda's |W| ||X||, squared)

Each layer keeps its most important ``1 - fraction`` heads and neurons (the same count in every
layer). Shrinking: ``c_attn`` keeps the q, k and v rows of the kept heads (its fused output is
[q heads | k heads | v heads], so a head's rows sit in three places), the attention ``c_proj`` and
the MLP ``c_proj`` keep the matching input columns, ``c_fc`` the rows (and bias entries) of the kept
neurons. The model reads each layer's head count from its projection (``impl.gpt.model``'s seam), so
the shrunk model runs unchanged; ``GPTConfig`` still states the unpruned widths.

``structured_masks`` gives the same pruning as masks on the dense model (the pruned rows and columns
zeroed): the shrunk model computes exactly what that masked model computes (the checks hold it to it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from impl.pruning.unstructured import block_linears

Keep = dict[str, list[list[int]]]  # {"heads": per layer the kept heads, "neurons": per layer the kept neurons}


def _head_cols(heads: list[int], head_dim: int) -> torch.Tensor:
    """Indices of the ``head_dim`` features of each head in ``heads``, in that order."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads \
        else torch.zeros(0, dtype=torch.long)


def qkv_rows(heads: list[int], n_head: int, head_dim: int) -> torch.Tensor:
    """Rows of a fused ``c_attn`` (3 * n_head * head_dim outputs) that belong to ``heads``: their q
    rows, then their k rows, then their v rows (the layout ``chunk(3)`` splits)."""
    cols = _head_cols(heads, head_dim)
    return torch.cat([part * n_head * head_dim + cols for part in range(3)])


@torch.no_grad()
def importance(model: nn.Module, calib_batches: torch.Tensor, batch_size: int = 16) -> dict[str, list[torch.Tensor]]:
    """``{"heads": per layer (n_head,), "neurons": per layer (n_hidden,)}`` float64 importances (see the
    module docstring) from one pass of ``calib_batches`` (n, T) token ids through ``model``."""
    device = next(model.parameters()).device
    grams, sq, hooks = [], [], []
    for block in model.blocks:
        d_attn, d_mlp = block.attn.c_proj.in_features, block.mlp.c_proj.in_features
        grams.append(torch.zeros(d_attn, d_attn, dtype=torch.float64, device=device))
        sq.append(torch.zeros(d_mlp, dtype=torch.float64, device=device))

        def attn_hook(_m, args, _o, g=grams[-1]):
            y = args[0].reshape(-1, args[0].shape[-1]).double()
            g += y.T @ y  # (d, d): only the head-diagonal blocks are read

        def mlp_hook(_m, args, _o, s=sq[-1]):
            s += args[0].reshape(-1, args[0].shape[-1]).double().square().sum(dim=0)

        hooks += [block.attn.c_proj.register_forward_hook(attn_hook), block.mlp.c_proj.register_forward_hook(mlp_hook)]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(calib_batches), batch_size):
            model(calib_batches[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    heads, neurons = [], []
    for block, g, s in zip(model.blocks, grams, sq, strict=True):
        w = block.attn.c_proj.weight.double()  # (C, n_head * hs)
        hs = block.attn.head_dim
        heads.append(torch.stack([((w[:, S] @ g[S][:, S]) * w[:, S]).sum()
                                  for S in (_head_cols([h], hs) for h in range(block.attn.n_head))]))
        neurons.append(block.mlp.c_proj.weight.double().square().sum(dim=0) * s)
    return {"heads": heads, "neurons": neurons}


def keep_most_important(scores: torch.Tensor, fraction: float) -> list[int]:
    """Indices (ascending) of the ``n - round(fraction * n)`` highest ``scores`` (at least one kept;
    ties to the lower index)."""
    n = scores.numel()
    n_keep = max(1, n - round(fraction * n))
    order = torch.argsort(-scores, stable=True)[:n_keep]
    return sorted(order.tolist())


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


@torch.no_grad()
def shrink(model: nn.Module, keep: Keep) -> None:
    """Remove, in place, every head and neuron not in ``keep`` (per layer lists of indices)."""
    for block, heads, neurons in zip(model.blocks, keep["heads"], keep["neurons"], strict=True):
        attn, mlp = block.attn, block.mlp
        if not heads or not neurons:
            raise ValueError("every layer must keep at least one head and one neuron")
        rows = qkv_rows(heads, attn.n_head, attn.head_dim).to(attn.c_attn.weight.device)
        cols = _head_cols(heads, attn.head_dim).to(rows.device)
        b = attn.c_attn.bias
        attn.c_attn = _linear(attn.c_attn.weight[rows], b[rows] if b is not None else None)
        attn.c_proj = _linear(attn.c_proj.weight[:, cols], attn.c_proj.bias)
        idx = torch.tensor(neurons, device=rows.device)
        b = mlp.c_fc.bias
        mlp.c_fc = _linear(mlp.c_fc.weight[idx], b[idx] if b is not None else None)
        mlp.c_proj = _linear(mlp.c_proj.weight[:, idx], mlp.c_proj.bias)


@torch.no_grad()
def structured_masks(model: nn.Module, keep: Keep) -> None:
    """The same pruning as ``shrink`` on the dense model: zero, in place, the q/k/v rows (and biases)
    and ``c_proj`` columns of every pruned head, the ``c_fc`` rows (and biases) and ``c_proj`` columns
    of every pruned neuron."""
    for block, heads, neurons in zip(model.blocks, keep["heads"], keep["neurons"], strict=True):
        attn, mlp = block.attn, block.mlp
        gone = [h for h in range(attn.n_head) if h not in heads]
        rows, cols = qkv_rows(gone, attn.n_head, attn.head_dim), _head_cols(gone, attn.head_dim)
        attn.c_attn.weight[rows] = 0
        if attn.c_attn.bias is not None:
            attn.c_attn.bias[rows] = 0
        attn.c_proj.weight[:, cols] = 0
        dead = torch.tensor([j for j in range(mlp.c_fc.out_features) if j not in set(neurons)], dtype=torch.long)
        mlp.c_fc.weight[dead] = 0
        if mlp.c_fc.bias is not None:
            mlp.c_fc.bias[dead] = 0
        mlp.c_proj.weight[:, dead] = 0


def select(model: nn.Module, calib_batches: torch.Tensor, head_fraction: float, neuron_fraction: float) -> Keep:
    """Which heads and neurons to keep: per layer the most important ``1 - fraction`` of each."""
    imp = importance(model, calib_batches)
    return {"heads": [keep_most_important(s, head_fraction) for s in imp["heads"]],
            "neurons": [keep_most_important(s, neuron_fraction) for s in imp["neurons"]]}


def block_linear_params(model: nn.Module) -> int:
    """Parameters (weights and biases) of every block's linears, counted on the modules as they are."""
    return sum(p.numel() for m in block_linears(model).values() for p in m.parameters())


def _gpt(config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    from impl.gpt.model import GPT

    return GPT.from_state(config, state)


@torch.no_grad()
def masked_logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor, heads: list[list[int]],
                  neurons: list[list[int]]) -> torch.Tensor:
    """Logits (B, T, vocab) of the dense GPT ``(config, state)`` with the pruned structures zeroed."""
    model = _gpt(config, state)
    structured_masks(model, {"heads": heads, "neurons": neurons})
    return model(idx)


@torch.no_grad()
def shrunk_logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor, heads: list[list[int]],
                  neurons: list[list[int]]) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT ``(config, state)`` with the pruned structures removed."""
    model = _gpt(config, state)
    shrink(model, {"heads": heads, "neurons": neurons})
    return model(idx)
