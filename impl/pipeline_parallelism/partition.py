"""Partitioning a GPT into pipeline stages: contiguous runs of blocks, balanced by parameter count or by
measured cost, each stage an ``nn.Module`` built from the model's own weights.

The forward of the shared GPT is ``embed`` -> ``blocks[0..L-1]`` -> ``head`` (``impl/gpt/model.py``); a stage
runs a slice of the blocks, the first stage also the embedding, the last also the final LayerNorm and the LM
head. The units ``[embed, block 0, ..., block L-1, head]`` are split into ``p`` contiguous runs, the embedding
always on the first stage and the head on the last; among all such splits the one with the smallest maximum
stage cost wins (the slowest stage sets the pipeline's pace), found by dynamic programming over the cut points.

Tied embedding / LM head (``tie_embeddings``): the first stage owns ``wte`` (the embedding) and the last stage
keeps its OWN copy of that matrix as ``lm_head.weight`` (Megatron-LM's way). The two copies start equal; each
stage's backward gives its copy the gradient of its own use, and ``runtime.reduce_tied_grads`` sums the two
between the first and the last rank before the optimizer step, so both copies receive the full gradient
(what the single-process tied weight gets) and stay identical after every step. With one stage the two are
one parameter, as in the model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from impl.gpt.model import GPT, lm_loss


class StageModule(nn.Module):
    """Stage ``index`` of ``n_stages``: blocks ``[first_block, end_block)`` of a GPT, plus the embedding on the
    first stage and ``ln_f`` / ``lm_head`` on the last. Parameter names are the GPT's (``blocks.3.attn...``,
    ``wte.weight``, ``lm_head.weight``) so gradients compare name by name with the full model's.

    ``forward``: first stage token ids (B, T) long, else hidden states (B, T, C); returns hidden states
    (B, T, C), or logits (B, T, vocab) on the last stage."""

    def __init__(self, model: GPT, index: int, n_stages: int, first_block: int, end_block: int):
        super().__init__()
        self.index, self.n_stages = index, n_stages
        self.n_embd = model.config.n_embd  # width of the hidden states that cross stages
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        if self.is_first:
            self.wte, self.wpe, self.drop = (copy.deepcopy(m) for m in (model.wte, model.wpe, model.drop))
        self.blocks = nn.ModuleDict({str(i): copy.deepcopy(model.blocks[i]) for i in range(first_block, end_block)})
        if self.is_last:
            self.ln_f = copy.deepcopy(model.ln_f)
            self.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
            if self.is_first and model.config.tie_embeddings:
                self.lm_head.weight = self.wte.weight  # one stage: the tie stays one parameter
            else:
                self.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # the last stage's copy
            self.lm_head.to(model.lm_head.weight.dtype)
        self.tied = model.config.tie_embeddings and n_stages > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            T = x.shape[1]
            x = self.drop(self.wte(x) + self.wpe(torch.arange(T, device=x.device)))  # (B, T, C)
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            x = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        return x


def balanced_cuts(costs: Sequence[float], n_stages: int) -> list[tuple[int, int]]:
    """Split units ``0..len(costs)-1`` into ``n_stages`` non-empty contiguous runs minimizing the largest run's
    cost sum (ties: the earliest cuts). Returns ``[(start, end), ...]`` half-open ranges, in order."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} units into {n_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][j]: smallest max-cost of splitting the first j units into k runs; cut[k][j]: where the last run starts
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    ranges, j = [], n
    for k in range(n_stages, 0, -1):
        ranges.append((cut[k][j], j))
        j = cut[k][j]
    return ranges[::-1]


def parameter_costs(model: GPT) -> list[float]:
    """Parameter count of each unit ``[embed, block 0, ..., block L-1, head]`` (the tied matrix counted on both
    ends: each stage stores and updates its copy)."""
    embed = model.wte.weight.numel() + model.wpe.weight.numel()
    head = sum(p.numel() for p in model.ln_f.parameters()) + model.lm_head.weight.numel()
    return [float(embed)] + [float(sum(p.numel() for p in b.parameters())) for b in model.blocks] + [float(head)]


def flop_costs(model: GPT, seq_len: int) -> list[float]:
    """Multiply-accumulates per token of the forward of each unit ``[embed, block 0, ..., block L-1, head]``
    at sequence length ``seq_len`` (the backward costs about twice each, so the proportions hold): a block
    12 C^2 (q, k, v, projection, 4x MLP) + T C (causal attention: T/2 keys on average, scores and values), the
    head C V, the embedding a lookup (C adds). Deterministic, unlike ``measured_costs``."""
    C, V = model.config.n_embd, model.config.vocab_size
    blocks = [float(sum(p.numel() for n, p in b.named_parameters() if n.endswith("weight") and p.dim() == 2)
                    + seq_len * C) for b in model.blocks]
    return [float(C), *blocks, float(C * V)]


def measured_costs(model: GPT, micro_batch: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds of forward + backward of each unit ``[embed, block 0, ..., block L-1, head + loss]`` on one
    micro-batch of token ids (B, T) (median of ``repeats``, after one warm-up): the cost a stage pays per
    micro-batch."""
    def timed(fn) -> float:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]

    T = micro_batch.shape[1]
    pos = torch.arange(T)
    with torch.no_grad():
        x = model.embed(micro_batch, pos)
    x = x.detach().requires_grad_(True)
    targets = torch.roll(micro_batch, -1, dims=1)

    def unit(fn):
        def run():
            model.zero_grad(set_to_none=True)
            out = fn()
            out.backward(torch.ones_like(out) if out.dim() else None)
        return run

    costs = [timed(unit(lambda: model.embed(micro_batch, pos)))]
    costs += [timed(unit(lambda b=b: b(x))) for b in model.blocks]
    costs.append(timed(unit(lambda: lm_loss(model.head(x), targets))))
    model.zero_grad(set_to_none=True)
    return costs


def partition(model: GPT, n_stages: int, costs: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Block ranges ``[(first_block, end_block), ...]`` of each stage, balancing ``costs`` of the units
    ``[embed, block 0, ..., block L-1, head]`` (default: ``parameter_costs``). The embedding joins the first
    stage and the head the last; each stage gets at least one block when there are enough blocks."""
    costs = list(parameter_costs(model) if costs is None else costs)
    L = len(model.blocks)
    if len(costs) != L + 2:
        raise ValueError(f"costs must have n_layer + 2 = {L + 2} entries (embed, blocks, head), got {len(costs)}")
    if n_stages == 1:
        return [(0, L)]
    if n_stages > L:
        raise ValueError(f"{n_stages} stages need at least as many blocks; the model has {L}")
    # fold the embedding into block 0 and the head into the last block: they must go with them
    units = [costs[0] + costs[1], *costs[2:L], costs[L] + costs[L + 1]] if L > 1 else [sum(costs)]
    return balanced_cuts(units, n_stages)


def build_stages(model: GPT, ranges: Sequence[tuple[int, int]]) -> list[StageModule]:
    """One ``StageModule`` per block range (copies of the model's weights, same dtype)."""
    return [StageModule(model, i, len(ranges), a, b) for i, (a, b) in enumerate(ranges)]


def build_stage(model: GPT, ranges: Sequence[tuple[int, int]], index: int) -> StageModule:
    """Only stage ``index`` (what one rank builds)."""
    a, b = ranges[index]
    return StageModule(model, index, len(ranges), a, b)
