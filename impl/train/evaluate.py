"""Evaluation in one place: full-split loss, perplexity, bits per byte, masked per-token loss.

Bits per byte is the one quality figure that compares models across tokenizers: a character
model and a BPE model predict different units, but both assign a probability to the same bytes.
A model whose mean loss is ``L`` nats per token over ``n_tokens`` tokens spells ``n_bytes`` bytes
with ``L * n_tokens / ln 2`` bits, so

    bits per byte = L * n_tokens / (n_bytes * ln 2)

(a character model on ASCII text has one byte per token: its bits per byte is ``L / ln 2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


@torch.no_grad()
def full_split_loss(model: torch.nn.Module, ids: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss (nats) over every non-overlapping ``block_size`` window of the split
    ``ids`` (1-D token ids), on the model's device: the whole split, no sampling noise (the tail
    shorter than one window is left out; ``split_loss_sum`` scores it too)."""
    block = model.config.block_size
    device = next(model.parameters()).device
    n = (len(ids) - 1) // block
    x = torch.from_numpy(ids[: n * block].astype(np.int64)).view(n, block)  # (n, block)
    y = torch.from_numpy(ids[1 : n * block + 1].astype(np.int64)).view(n, block)
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i : i + batch_size].to(device))  # (b, block, vocab)
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), y[i : i + batch_size].reshape(-1).to(device),
            reduction="sum",
        ).item()
    return total / (n * block)


@torch.no_grad()
def split_loss_sum(model: torch.nn.Module, ids: np.ndarray, batch_size: int = 64) -> tuple[float, int]:
    """(summed loss in nats, tokens scored) of predicting every token of ``ids`` after the first,
    in non-overlapping ``block_size`` windows plus one shorter window for the tail: each token
    ``ids[1:]`` is scored exactly once, so the sum covers the bytes of ``ids[1:]``."""
    ids = np.asarray(ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {len(ids)}")
    block = model.config.block_size
    device = next(model.parameters()).device
    n = (len(ids) - 1) // block
    model.eval()
    total = 0.0
    if n:
        total = full_split_loss(model, ids[: n * block + 1], batch_size) * n * block
    tail = len(ids) - 1 - n * block
    if tail:
        x = torch.from_numpy(ids[n * block : n * block + tail].astype(np.int64))[None].to(device)
        y = torch.from_numpy(ids[n * block + 1 :].astype(np.int64)).to(device)
        total += F.cross_entropy(model(x)[0].float(), y, reduction="sum").item()
    return total, len(ids) - 1


def perplexity(loss_nats_per_token: float) -> float:
    """``exp(loss)``: the number of equally likely tokens the model is as unsure as."""
    return math.exp(loss_nats_per_token)


def bits_per_token(loss_nats_per_token: float) -> float:
    """The loss in bits: ``loss / ln 2``."""
    return loss_nats_per_token / LN2


def bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per byte of text that ``n_tokens`` tokens spell in ``n_bytes`` bytes, at a mean loss of
    ``loss_nats_per_token``: ``loss * n_tokens / (n_bytes * ln 2)``."""
    if n_tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"bits per byte needs positive counts, got n_tokens={n_tokens}, n_bytes={n_bytes}")
    return loss_nats_per_token * n_tokens / (n_bytes * LN2)


def evaluate_ids(model: torch.nn.Module, ids: Sequence[int] | np.ndarray, token_nbytes: Callable[[int], int],
                 batch_size: int = 64) -> dict[str, Any]:
    """Loss (nats/token), perplexity, bits per token and bits per byte of ``model`` on the token ids
    ``ids``; ``token_nbytes(id)`` is the number of bytes one id spells (it counts the bytes of the
    scored tokens ``ids[1:]``)."""
    ids = np.asarray(ids, dtype=np.int64)
    total, n_tokens = split_loss_sum(model, ids, batch_size)
    lengths = np.array([token_nbytes(i) for i in range(int(ids.max()) + 1)], dtype=np.int64)
    n_bytes = int(lengths[ids[1:]].sum())
    loss = total / n_tokens
    return {
        "loss_nats_per_token": loss,
        "perplexity": perplexity(loss),
        "bits_per_token": bits_per_token(loss),
        "bits_per_byte": bits_per_byte(loss, n_tokens, n_bytes),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / n_tokens,
    }


def evaluate_text(model: torch.nn.Module, encode: Callable[[str], Sequence[int]], token_nbytes: Callable[[int], int],
                  text: str, batch_size: int = 64) -> dict[str, Any]:
    """``evaluate_ids`` on ``encode(text)``: the one call that gives a model's bits per byte on a text."""
    return evaluate_ids(model, encode(text), token_nbytes, batch_size)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats, fp32) over the positions where ``mask`` is 1 (for SFT: the
    assistant's tokens); ``logits`` (B, T, V), ``targets`` and ``mask`` (B, T). Raises on an empty mask."""
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"mask {tuple(mask.shape)}")
    weights = mask.to(torch.float32)
    count = weights.sum()
    if count.item() == 0:
        raise ValueError("masked_token_loss: the mask selects no position")
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none")
    return (per_token * weights.reshape(-1)).sum() / count
