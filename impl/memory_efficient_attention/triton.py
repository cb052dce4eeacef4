"""Split-K (Flash-Decoding) attention as two Triton kernels: partials, then an exact combine.

Decoding attends one new query per head to a long KV cache. One program per (batch, head)
would walk all S keys alone and leave most of a GPU idle; Flash-Decoding cuts the keys into
``num_splits`` pieces so that B * nh * num_splits programs run at once:

1. ``_split_k_partials_kernel``: program (row, split) reads only its piece of K and V once,
   with an online softmax, and writes a normalized partial output (hs floats) and its
   log-sum-exp (one float). An empty piece writes lse = -inf and o = 0.
2. ``_split_k_combine_kernel``: program (row) merges the partials exactly,
   o = sum_i exp(lse_i - max lse) o_i / sum_i exp(lse_i - max lse).

Memory beyond the output is num_splits * (hs + 1) floats per query row, independent of S.
The kernels also accept T > 1 (one program per query row, causal mask bottom-right aligned),
and K, V may be strided views of a larger cache buffer: nothing is copied. Math is float32
(scores are dot products of a vector with a tile, no ``tl.dot``), whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from impl.flash_attention.triton import INTERPRET, store_dtype

BLOCK_N = 64


@triton.jit
def _split_k_partials_kernel(
    Q, K, V, O_PART, LSE_PART, T, S, n_heads, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
    stride_vs, chunk, kv_offset, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # flat (b, h, t) over the contiguous q (B, nh, T, hs)
    split = tl.program_id(1)  # rows on axis 0, whose limit is 2^31 - 1, not 65535
    n_splits = tl.num_programs(1)
    bh = row // T
    b, h, t = bh // n_heads, bh % n_heads, row % T
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM  # a head dim like 80 is padded to 128 lanes; the padding loads zeros
    q = tl.load(Q + row * HEAD_DIM + dims, mask=dim_ok, other=0.0).to(tl.float32)
    K = K + b * stride_kb + h * stride_kh
    V = V + b * stride_vb + h * stride_vh
    start = split * chunk
    end = tl.minimum(start + chunk, S)
    if CAUSAL:  # query t is key position kv_offset + t and sees keys up to it
        end = tl.minimum(end, t + kv_offset + 1)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        ok = cols < end
        mask = ok[:, None] & dim_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_ks + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(q[None, :] * k, 1) * qk_scale, float("-inf"))  # (BLOCK_N,), log2 units
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: cols[0] < end
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        v = tl.load(V + cols[:, None] * stride_vs + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    seen = l_i > 0  # False only for an empty (or wholly masked) piece
    o = acc / tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O_PART + (row * n_splits + split) * HEAD_DIM + dims, o, mask=dim_ok)
    tl.store(LSE_PART + row * n_splits + split, lse)


@triton.jit
def _split_k_combine_kernel(
    O_PART, LSE_PART, Out, n_splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < n_splits
    lse = tl.load(LSE_PART + row * n_splits + splits, mask=split_ok, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # (BLOCK_SPLITS,): rescaled so the largest weight is 1
    mask = split_ok[:, None] & (dims < HEAD_DIM)[None, :]
    parts = O_PART + (row * n_splits + splits[:, None]) * HEAD_DIM + dims[None, :]
    o_parts = tl.load(parts, mask=mask, other=0.0)  # (BLOCK_SPLITS, BLOCK_D)
    o = tl.sum(w[:, None] * o_parts, 0) / tl.sum(w, 0)
    tl.store(Out + row * HEAD_DIM + dims, o.to(Out.dtype.element_ty), mask=dims < HEAD_DIM)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_splits: int) -> None:
    if not (q.is_cuda or INTERPRET):
        raise ValueError(
            "the Triton split-K kernel needs CUDA tensors; to run it on CPU set TRITON_INTERPRET=1 "
            "before triton is first imported (the tests do this in tests/conftest.py)"
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the Triton split-K kernel needs K and V contiguous in their last (head) dimension")


def _partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int,
    chunk: int,
    kv_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch kernel 1: o_part (B*nh*T, num_splits, hs) and lse_part (B*nh*T, num_splits), float32."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    rows = B * nh * T
    o_part = torch.full((rows, num_splits, hs), float("nan"), dtype=torch.float32, device=q.device)
    lse_part = torch.full((rows, num_splits), float("nan"), dtype=torch.float32, device=q.device)
    _split_k_partials_kernel[(rows, num_splits)](
        q, k, v, o_part, lse_part, T, S, nh, *k.stride()[:3], *v.stride()[:3], chunk, kv_offset,
        1.4426950408889634 / math.sqrt(hs),
        CAUSAL=causal and T > 1, HEAD_DIM=hs, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(hs),
    )  # fmt: skip
    return o_part, lse_part


def _combine(o_part: torch.Tensor, lse_part: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Launch kernel 2: the merged output shaped and typed like q (B, nh, T, hs)."""
    rows, num_splits, hs = o_part.shape
    o = torch.full(q.shape, float("nan"), dtype=store_dtype(q.dtype), device=q.device)
    _split_k_combine_kernel[(rows,)](
        o_part, lse_part, o, num_splits, HEAD_DIM=hs, BLOCK_D=triton.next_power_of_2(hs),
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
    )  # fmt: skip
    return o.to(q.dtype)


def split_k_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, num_splits: int = 8
) -> torch.Tensor:
    """Flash-Decoding attention (B, nh, T, hs): ``num_splits`` key pieces of ceil(S / num_splits) keys."""
    _check_inputs(q, k, v, num_splits)
    q = q.contiguous()  # (B, nh, T, hs): T is 1 when decoding, so this copy is tiny
    S = k.shape[2]
    chunk = triton.cdiv(S, num_splits)  # pieces past the end of the cache are empty
    o_part, lse_part = _partials(q, k, v, causal, num_splits, chunk, S - q.shape[2])
    return _combine(o_part, lse_part, q)
