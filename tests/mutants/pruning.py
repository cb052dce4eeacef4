"""Mutants of project 17: magnitude masks that count or compare wrongly, Wanda scored by |W| alone or
compared across the whole layer, a head slicing that assumes interleaved q/k/v rows, a bias sliced by
position, and a mask applied only after fine-tuning."""

from __future__ import annotations

from unittest.mock import patch

import torch

from impl.gpt.model import GPT
from impl.pruning import fast, structured
from impl.pruning.unstructured import apply_masks
from impl.train.loop import train


def floor_count(weights, sparsity, scope="layer"):
    """Prunes ``int(sparsity * n)`` (truncation) instead of ``round``: one too few when the fraction is >= .5."""
    with patch("impl.pruning.fast.prune_count", lambda n, s: int(s * n)):
        return fast.magnitude_masks(weights, sparsity, scope)


def signed_scores(weights, sparsity, scope="layer"):
    """Scores by the signed weight: prunes the most negative weights, not the smallest magnitudes."""
    lowest = min(float(w.min()) for w in weights)
    return fast.magnitude_masks([w.detach() - lowest + 1 for w in weights], sparsity, scope)  # all > 0, signed order


def threshold_prunes_ties(weights, sparsity, scope="layer"):
    """Prunes every |w| <= the k-th smallest magnitude: all weights tied at the threshold go, too many."""
    groups = [[w] for w in weights] if scope == "layer" else [weights]
    out = []
    for group in groups:
        mags = torch.cat([w.detach().abs().flatten() for w in group])
        k = round(sparsity * mags.numel())
        threshold = torch.sort(mags).values[k - 1] if k > 0 else -1.0
        out += [w.detach().abs() > threshold for w in group]
    return out


def scores_by_weight_alone(weight, inputs, sparsity):
    """Wanda asked, magnitude done: |W| compared per row, the activation norms ignored (still reported)."""
    norms = fast.input_norms(inputs)
    _, mask = fast.wanda_mask(weight, torch.ones_like(norms), sparsity)
    return {"scores": weight.detach().double().abs() * norms[None, :], "mask": mask}


def compared_per_layer(weight, inputs, sparsity):
    """Wanda's scores with one comparison over the whole matrix instead of per output row."""
    scores = weight.detach().double().abs() * fast.input_norms(inputs)[None, :]
    keep = fast.magnitude_masks([scores], sparsity, "layer")[0]
    return {"scores": scores, "mask": keep}


def qkv_sliced_as_one_block(config, state, idx, heads, neurons):
    """Shrinks c_attn as if each head owned 3 * head_dim consecutive rows ([q k v] per head), which is
    not the fused layout ([all q | all k | all v])."""
    def interleaved(hs, n_head, head_dim):
        return torch.cat([torch.arange(3 * h * head_dim, 3 * (h + 1) * head_dim) for h in hs])

    with patch("impl.pruning.structured.qkv_rows", interleaved):
        return structured.shrunk_logits(config, state, idx, heads, neurons)


@torch.no_grad()
def neuron_bias_by_position(config, state, idx, heads, neurons):
    """Keeps c_fc's weight rows of the kept neurons but the first ``len(neurons)`` bias entries."""
    model = GPT.from_state(config, state)
    biases = [b.mlp.c_fc.bias.clone() if b.mlp.c_fc.bias is not None else None for b in model.blocks]
    structured.shrink(model, {"heads": heads, "neurons": neurons})
    for block, b, kept in zip(model.blocks, biases, neurons, strict=True):
        if b is not None:
            block.mlp.c_fc.bias.copy_(b[: len(kept)])
    return model(idx)


def mask_after_finetune(model, masks, train_ids, val_ids, cfg):
    """Zeroes the pruned weights, fine-tunes the plain model (they grow back), zeroes them again at the end."""
    apply_masks(model, masks)
    result = train(model, train_ids, val_ids, cfg, progress=False)
    apply_masks(model, masks)
    return result
