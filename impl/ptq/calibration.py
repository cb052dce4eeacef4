"""Calibration for post-training compression: windows of the TRAINING split (never held-out text, which the
perplexities are measured on), drawn at seeded random offsets, and the block-by-block pass that feeds them to
a GPT's layers (GPTQ, P14; Wanda, P17)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn


def calibration_batches(train_ids: np.ndarray, n_samples: int = 128, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive token ids of ``train_ids`` (1-D), at offsets drawn
    uniformly with ``seed`` (the same seed gives the same set): (n_samples, seq_len) int64."""
    ids = np.asarray(train_ids)
    if len(ids) < seq_len:
        raise ValueError(f"calibration needs windows of {seq_len} tokens; the training split has {len(ids)}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=n_samples)
    return torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int64))


def _linears(module: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


@torch.no_grad()
def block_by_block(model: nn.Module, calib_batches: torch.Tensor, statistic: Callable[[nn.Linear], Any],
                   targets: tuple[str, ...], lm_head: bool = False, batch_size: int = 16
                   ) -> Iterator[tuple[str, dict[str, nn.Linear], dict[str, Any]]]:
    """The sequential calibration pass of GPTQ and Wanda, on a deep copy of ``model`` (which is not modified).

    For each block in order: every target linear gets ``statistic(layer)`` (an object with ``add(inputs)``),
    fed the inputs the layer sees while the calibration windows ``calib_batches`` (n, T) run through the block;
    then ``(prefix, layers, stats)`` is yielded (``prefix`` = ``"blocks.<i>."``). The caller may change the
    layers' weights in place before asking for the next item: the next block's inputs are this block's
    outputs after that change, so later layers are calibrated on what they will actually see. With
    ``lm_head`` a last item ``("", {"lm_head": head}, stats)`` follows, fed the final layer norm's outputs."""
    work = copy.deepcopy(model).eval()
    device = next(work.parameters()).device
    ids = calib_batches.to(device)
    pos = torch.arange(ids.shape[1], device=device)
    xs = [work.embed(ids[i:i + batch_size], pos) for i in range(0, len(ids), batch_size)]  # each (b, T, C)
    for b, block in enumerate(work.blocks):
        layers = _linears(block, targets)
        stats = {name: statistic(m) for name, m in layers.items()}
        hooks = [m.register_forward_hook(lambda _m, args, _o, acc=stats[name]: acc.add(args[0]))
                 for name, m in layers.items()]
        for x in xs:
            block(x)
        for h in hooks:
            h.remove()
        yield f"blocks.{b}.", layers, stats
        xs = [block(x) for x in xs]  # through the (changed) block: the next block's inputs
    if lm_head:
        acc = statistic(work.lm_head)
        for x in xs:
            acc.add(work.ln_f(x))
        yield "", {"lm_head": work.lm_head}, {"lm_head": acc}
