"""Broken on purpose: variants of project 9's FlashAttention that its checks must reject.

Each mutant is the real implementation with one step swapped for a classic bug (patched in
for the duration of the call), so a check that lets it through would also miss that bug.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any
from unittest import mock

import torch

from impl.flash_attention import fast
from impl.flash_attention import naive as flash_naive


@contextmanager
def _patched(name: str, replacement: Callable) -> Iterator[None]:
    with mock.patch.object(fast, name, replacement):
        yield


def _step_without_rescale(
    m: torch.Tensor, denom: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v_blk: torch.Tensor
) -> tuple:
    m_new = torch.maximum(m, s.amax(dim=-1))
    p = torch.exp(s - m_new.unsqueeze(-1))
    alpha = torch.exp(m - m_new)
    return m_new, alpha * denom + p.sum(dim=-1), acc + p @ v_blk  # bug: acc keeps its old maximum


def _step_without_denominator_rescale(
    m: torch.Tensor, denom: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v_blk: torch.Tensor
) -> tuple:
    m_new = torch.maximum(m, s.amax(dim=-1))
    p = torch.exp(s - m_new.unsqueeze(-1))
    alpha = torch.exp(m - m_new)
    return m_new, denom + p.sum(dim=-1), alpha.unsqueeze(-1) * acc + p @ v_blk  # bug: denom not rescaled


_key_block_starts = fast.key_block_starts  # the real one, kept before any patching


def _all_but_last_block(*args: Any) -> range:
    return _key_block_starts(*args)[:-1]


def _no_mask(*args: Any) -> None:
    return None


def accumulator_not_rescaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The output accumulator is not multiplied by exp(m_old - m_new) when the max grows."""
    with _patched("online_softmax_step", _step_without_rescale):
        return fast.flash_attention(q, k, v, causal)


def denominator_not_rescaled_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, LSE) when the running sum of exponentials is not rescaled as the max grows."""
    with _patched("online_softmax_step", _step_without_denominator_rescale):
        return fast.flash_attention_with_lse(q, k, v, causal)


def wrong_scale(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Scores divided by hs instead of sqrt(hs)."""
    return fast.flash_forward(q, k, v, causal, scale=1.0 / q.shape[-1])[0]


def causal_mask_dropped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Diagonal tiles left unmasked: future keys inside the tile that crosses the diagonal leak in."""
    with _patched("tile_visibility", _no_mask):
        return fast.flash_attention(q, k, v, causal)


def last_tile_skipped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """The loop over key blocks stops one block early (range end computed without the tail)."""
    with _patched("key_block_starts", _all_but_last_block):
        return fast.flash_attention(q, k, v, causal)


def grads_without_delta(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward with dS = P * dP, missing the softmax correction D = rowsum(dO * O)."""
    with _patched("row_delta", lambda o, do: torch.zeros_like(o[..., 0])):
        return fast.flash_attention_grads(q, k, v, causal, dy)


def grads_last_tile_skipped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward both stop one key block early."""
    with _patched("key_block_starts", _all_but_last_block):
        return fast.flash_attention_grads(q, k, v, causal, dy)


def _triton() -> ModuleType:
    from impl.flash_attention import triton as flash_triton  # lazily: TRITON_INTERPRET must be set first

    return flash_triton


def triton_causal_top_left(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, LSE) of the kernel launched with kv_offset 0: a top-left causal mask, wrong if T < S."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _triton()._forward(q, k, v, causal, kv_offset=0)


class _TopLeftBackward(torch.autograd.Function):
    """Correct forward kernel; backward kernels launched with the top-left causal offset."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        o, lse = _triton()._forward(q, k, v, causal, k.shape[2] - q.shape[2])
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple:
        q, k, v, o, lse = ctx.saved_tensors
        return (*_triton()._backward(q, k, v, o, lse, do, ctx.causal, kv_offset=0), None)


def triton_grads_causal_top_left(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton gradients whose backward kernels use a top-left aligned causal mask."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    return flash_naive.grads_of(_TopLeftBackward.apply, q, k, v, causal, dy)

