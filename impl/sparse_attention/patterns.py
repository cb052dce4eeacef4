"""Sparse attention patterns at block granularity: which key blocks each query block may see.

A pattern is a boolean *layout* of shape (n_blocks, n_blocks) (or (B, nh, n_blocks, n_blocks)
for a learned, per-head pattern): ``layout[i, j]`` is True when the queries of block ``i`` may
attend to the keys of block ``j``. Block ``i`` holds tokens ``i*b .. i*b + b - 1``; a sequence
whose length is not a multiple of ``b`` ends in a shorter block.

Every builder keeps the diagonal block, so no query is ever left without a key to attend to
(with a causal mask a token always sees at least itself).
"""

from __future__ import annotations

import math

import torch

from impl.gpt.attention import causal_mask

PATTERN_KINDS = ("window", "bigbird", "fixed")


def num_blocks(seq_len: int, block_size: int) -> int:
    """How many blocks of ``block_size`` tokens cover ``seq_len`` tokens (the last may be short)."""
    if block_size < 1 or seq_len < 1:
        raise ValueError(f"need seq_len >= 1 and block_size >= 1, got {seq_len} and {block_size}")
    return math.ceil(seq_len / block_size)


def _grid(n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query-block index (n, 1) and key-block index (1, n)."""
    i = torch.arange(n_blocks).unsqueeze(1)
    return i, i.transpose(0, 1)


def window_layout(n_blocks: int, window: int, n_global: int = 0, causal: bool = False) -> torch.Tensor:
    """Longformer: block ``i`` sees blocks ``i - window .. i + window``; the first ``n_global``
    blocks are global (they see every block, and every block sees them). With ``causal`` only
    blocks ``j <= i`` are kept, so a global block becomes a summary that every later block reads.

    Returns a bool (n_blocks, n_blocks) layout.
    """
    if window < 0 or n_global < 0:
        raise ValueError(f"window and n_global must be >= 0, got {window} and {n_global}")
    i, j = _grid(n_blocks)
    layout = (i - j).abs() <= window
    layout[:n_global, :] = True  # global rows: see everything
    layout[:, :n_global] = True  # global columns: seen by everything
    if causal:
        layout &= j <= i
    return layout


def bigbird_layout(
    n_blocks: int, window: int, n_global: int, n_random: int, seed: int, causal: bool = False
) -> torch.Tensor:
    """BigBird: the window + global layout plus ``n_random`` random key blocks per query block.

    The random blocks are drawn, without replacement and from a generator seeded with ``seed``,
    among the blocks the window and globals do not already cover (and, with ``causal``, only
    blocks ``j <= i``); a row with fewer candidates takes them all. Global rows already see
    everything they may, so they draw nothing. Returns a bool (n_blocks, n_blocks) layout.
    """
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    layout = window_layout(n_blocks, window, n_global, causal)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_global, n_blocks):
        reachable = torch.arange(i + 1 if causal else n_blocks)
        candidates = reachable[~layout[i, reachable]]
        picked = candidates[torch.randperm(len(candidates), generator=gen)[:n_random]]
        layout[i, picked] = True
    return layout


def fixed_layout(n_blocks: int, stride: int, causal: bool = False) -> torch.Tensor:
    """Sparse Transformer "fixed" pattern (Child et al., 2019) in blocks: the sequence is cut
    into chunks of ``stride`` blocks; a block sees every block of its own chunk (local) and the
    last block of every chunk (the summary columns, which carry information across chunks).

    With ``stride`` near sqrt(n_blocks) each row keeps about 2 * sqrt(n_blocks) blocks: the
    paper's O(n sqrt(n)) attention. Returns a bool (n_blocks, n_blocks) layout.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    i, j = _grid(n_blocks)
    layout = (i // stride == j // stride) | (j % stride == stride - 1)
    if causal:
        layout &= j <= i
    return layout


def build_layout(
    kind: str,
    n_blocks: int,
    causal: bool = False,
    window: int = 1,
    n_global: int = 0,
    n_random: int = 0,
    seed: int = 0,
    stride: int = 2,
) -> torch.Tensor:
    """One entry point over the pattern kinds ("window", "bigbird", "fixed"); each kind reads
    only its own parameters. Returns a bool (n_blocks, n_blocks) layout."""
    if kind == "window":
        return window_layout(n_blocks, window, n_global, causal)
    if kind == "bigbird":
        return bigbird_layout(n_blocks, window, n_global, n_random, seed, causal)
    if kind == "fixed":
        return fixed_layout(n_blocks, stride, causal)
    raise ValueError(f"unknown pattern kind {kind!r}; known kinds: {', '.join(PATTERN_KINDS)}")


def check_layout(layout: torch.Tensor, n_blocks: int) -> None:
    """Raise a ValueError unless ``layout`` is a bool (..., n_blocks, n_blocks) layout that keeps
    every diagonal block (the guarantee that no query row is empty)."""
    if layout.dtype != torch.bool or layout.dim() < 2 or layout.shape[-2:] != (n_blocks, n_blocks):
        raise ValueError(
            f"layout must be a bool tensor ending in ({n_blocks}, {n_blocks}) for this sequence, "
            f"got {layout.dtype} of shape {tuple(layout.shape)}"
        )
    if not layout.diagonal(dim1=-2, dim2=-1).all():
        raise ValueError("layout must keep every diagonal block, or some query would see no key at all")


def expand_layout(layout: torch.Tensor, block_size: int, seq_len: int, causal: bool) -> torch.Tensor:
    """Token mask (..., seq_len, seq_len) of a block layout (..., n, n): True where query token
    ``t`` may attend key token ``s``; with ``causal`` also ``s <= t``."""
    mask = layout.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    mask = mask[..., :seq_len, :seq_len]  # the last block may be shorter than block_size
    if causal:
        mask = mask & causal_mask(seq_len, seq_len, layout.device)
    return mask


def kept_fraction(layout: torch.Tensor) -> float:
    """Share of the (query block, key block) pairs the layout computes (1.0 = dense)."""
    return layout.float().mean().item()
