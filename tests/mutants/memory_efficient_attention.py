"""Broken on purpose: variants of project 22's chunked and split-K attention its checks must reject.

The merge mutants are complete (wrong) merge functions; the others run the real implementation
with one piece patched in for the duration of the call, or launch the real Triton kernels with
one wrong argument.
"""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import torch

from impl.memory_efficient_attention import fast

Merge = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_split_bounds = fast.split_bounds  # the real one, kept before any patching


def combine_without_rescaling(
    o_parts: torch.Tensor, lse_parts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partials averaged as if every piece held the same softmax mass (no exp(lse_i - max) weights)."""
    return o_parts.mean(dim=0), torch.logsumexp(lse_parts, dim=0)


def combine_without_max_subtraction(
    o_parts: torch.Tensor, lse_parts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights exp(lse_i) taken directly: right on paper, inf / inf = NaN once scores pass ~88."""
    w = torch.exp(lse_parts)
    total = w.sum(dim=0)
    return (w.unsqueeze(-1) * o_parts).sum(dim=0) / total.unsqueeze(-1), torch.log(total)


def _with_merge(merge: Merge, attend: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    with mock.patch.object(fast, "combine_partials", merge):
        return attend(*args)


def _with_bounds(bounds: Callable[[int, int], list[tuple[int, int]]], *args: object) -> torch.Tensor:
    with mock.patch.object(fast, "split_bounds", bounds):
        return fast.chunked_attention(*args)


def chunked_combine_without_rescaling(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 1
) -> torch.Tensor:
    """Chunked attention whose running merge averages the pieces."""
    return _with_merge(combine_without_rescaling, fast.chunked_attention, q, k, v, causal, num_splits)


def chunked_drops_last_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 1
) -> torch.Tensor:
    """Chunked attention that never visits its last key piece."""
    return _with_bounds(lambda n, s: _split_bounds(n, s)[:-1], q, k, v, causal, num_splits)


def chunked_boundary_off_by_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 1
) -> torch.Tensor:
    """Pieces end one key early (inclusive/exclusive mix-up): every piece loses its last key."""
    bounds = lambda n, s: [(a, max(a, b - 1)) for a, b in _split_bounds(n, s)]
    return _with_bounds(bounds, q, k, v, causal, num_splits)


def split_k_combine_without_rescaling(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 8
) -> torch.Tensor:
    """Split-K whose final merge averages the partial outputs."""
    return _with_merge(combine_without_rescaling, fast.split_k_attention, q, k, v, causal, num_splits)


def split_k_combine_without_max_subtraction(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 8
) -> torch.Tensor:
    """Split-K whose final merge exponentiates the raw LSEs."""
    return _with_merge(combine_without_max_subtraction, fast.split_k_attention, q, k, v, causal, num_splits)


def _triton_split_k(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int,
    chunk_delta: int,
    offset: bool,
) -> torch.Tensor:
    from impl.memory_efficient_attention import triton as split_k_triton  # lazily: after TRITON_INTERPRET

    q = q.contiguous()
    S = k.shape[2]
    chunk = -(-S // num_splits) + chunk_delta
    kv_offset = S - q.shape[2] if offset else 0
    o_part, lse_part = split_k_triton._partials(q, k, v, causal, num_splits, chunk, kv_offset)
    return split_k_triton._combine(o_part, lse_part, q)


def triton_chunk_off_by_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 8
) -> torch.Tensor:
    """The partials kernel launched with pieces one key too short: keys past n * (chunk - 1) are lost."""
    return _triton_split_k(q, k, v, causal, num_splits, chunk_delta=-1, offset=True)


def triton_causal_top_left(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 8
) -> torch.Tensor:
    """The partials kernel launched with kv_offset 0: queries after a cache see only the first keys."""
    return _triton_split_k(q, k, v, causal, num_splits, chunk_delta=0, offset=False)
