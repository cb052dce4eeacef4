"""FlashAttention-2 as Triton kernels: a tiled forward and a recomputing backward.

One program owns one block of BLOCK_M queries of one (batch, head) and walks the key blocks
with the online softmax (running max, running sum, rescaled accumulator), all in registers /
SRAM; only O and the row log-sum-exp go back to memory. The backward is two kernels, as in
FlashAttention-2: one program per key block accumulates dK, dV over the query blocks, one per
query block accumulates dQ over the key blocks, both recomputing P = exp(QK^T - lse).

Details that bite:
- scores are kept in log2 units (scale * log2(e)) so the exponentials are ``exp2``;
- a head dimension that is not a power of two (40, 80) is padded to the next power of two
  inside the kernel: masked loads fill the padding with zeros, which add nothing to q.k;
- tails (T or S not a multiple of the block) are masked loads and masked stores;
- in the CPU interpreter (TRITON_INTERPRET=1) ``tl.dot`` on bf16 is wrong, so tiles are upcast
  to float32 there; on a GPU bf16/fp16 tiles go to the tensor cores with float32 accumulation,
  and float32 tiles use IEEE precision (not TF32) so float32 results stay float32-accurate;
- the interpreter also truncates float32 -> bf16 stores where a GPU rounds to nearest even, so
  there the kernels write float32 and torch rounds (``store_dtype``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from impl.flash_attention.naive import grads_of

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 64
BLOCK_N = 64
LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, n_rows, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), BLOCK_D) tile of a contiguous (n_rows, HEAD_DIM) matrix, zeros outside it."""
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (dims[None, :] < HEAD_DIM)
    tile = tl.load(base + rows[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_rows(base, rows, n_rows, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (dims[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * HEAD_DIM + dims[None, :], tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _visible(rows, cols, S, kv_offset, CAUSAL: tl.constexpr):
    """(M, N) mask: key exists, and (causal) key col <= query row + kv_offset (bottom-right)."""
    ok = (cols < S)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + kv_offset)
    return ok


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, LSE, T, S, kv_offset, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # (batch, head) pair: inputs are contiguous (B, nh, L, hs)
    Q, Out, LSE = Q + bh * T * HEAD_DIM, Out + bh * T * HEAD_DIM, LSE + bh * T
    K, V = K + bh * S * HEAD_DIM, V + bh * S * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, rows, T, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if CAUSAL:  # key blocks past this query block's last diagonal key are never loaded
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + kv_offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, cols, S, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(_visible(rows, cols, S, kv_offset, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, cols, S, HEAD_DIM, BLOCK_D, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    _store_rows(Out, rows, T, acc / l_i[:, None], HEAD_DIM, BLOCK_D)
    tl.store(LSE + rows, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, mask=rows < T)  # natural log


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, T, S, kv_offset, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, DO, LSE, DELTA = Q + bh * T * HEAD_DIM, DO + bh * T * HEAD_DIM, LSE + bh * T, DELTA + bh * T
    K, V = K + bh * S * HEAD_DIM, V + bh * S * HEAD_DIM
    DK, DV = DK + bh * S * HEAD_DIM, DV + bh * S * HEAD_DIM
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(K, cols, S, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V, cols, S, HEAD_DIM, BLOCK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # query blocks wholly above this key block's diagonal do not see it
        lo = tl.maximum(pid_n * BLOCK_N - kv_offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Q, rows, T, HEAD_DIM, BLOCK_D, UPCAST)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(DO, rows, T, HEAD_DIM, BLOCK_D, UPCAST)
        lse = tl.load(LSE + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (sm_scale * 1.4426950408889634)
        visible = _visible(rows, cols, S, kv_offset, CAUSAL) & (rows < T)[:, None]
        p = tl.where(visible, tl.math.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # softmax backward on one tile
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    _store_rows(DK, cols, S, dk * sm_scale, HEAD_DIM, BLOCK_D)
    _store_rows(DV, cols, S, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, T, S, kv_offset, sm_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q, DO, DQ = Q + bh * T * HEAD_DIM, DO + bh * T * HEAD_DIM, DQ + bh * T * HEAD_DIM
    LSE, DELTA = LSE + bh * T, DELTA + bh * T
    K, V = K + bh * S * HEAD_DIM, V + bh * S * HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_rows(Q, rows, T, HEAD_DIM, BLOCK_D, UPCAST)
    do = _load_rows(DO, rows, T, HEAD_DIM, BLOCK_D, UPCAST)
    lse = tl.load(LSE + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + kv_offset)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, cols, S, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(V, cols, S, HEAD_DIM, BLOCK_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (sm_scale * 1.4426950408889634)
        visible = _visible(rows, cols, S, kv_offset, CAUSAL)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQ, rows, T, dq * sm_scale, HEAD_DIM, BLOCK_D)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the kernels write: float32 in the interpreter (whose downcasts truncate), else ``dtype``."""
    return torch.float32 if INTERPRET and dtype in (torch.bfloat16, torch.float16) else dtype


def _launch_options(q: torch.Tensor) -> dict:
    """Compile-time options shared by the three kernels for inputs like ``q`` (B, nh, T, hs)."""
    hs = q.shape[-1]
    if not (q.is_cuda or INTERPRET):
        raise ValueError(
            "the Triton attention kernel needs CUDA tensors; to run it on CPU set TRITON_INTERPRET=1 "
            "before triton is first imported (the tests do this in tests/conftest.py)"
        )
    if not 16 <= hs <= 256:
        raise ValueError(f"the Triton attention kernel supports head dims 16..256, got {hs}")
    return {
        "HEAD_DIM": hs,
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_D": triton.next_power_of_2(hs),  # 40 -> 64, 80 -> 128: padded, masked lanes
        "UPCAST": INTERPRET,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # ignored for bf16/fp16
        # float32 tiles are twice the bytes: 3 pipeline stages would need up to 208 KiB of shared
        # memory in the dQ kernel (over an A100's 164 KiB); 2 stages need at most 144 KiB
        "num_stages": 2 if q.dtype == torch.float32 else 3,
    }


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, kv_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: output (B, nh, T, hs) and float32 row LSE (B, nh, T)."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    # NaN, not garbage, wherever the kernel would fail to write
    o = torch.full(q.shape, float("nan"), dtype=store_dtype(q.dtype), device=q.device)
    lse = torch.full((B, nh, T), float("nan"), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, BLOCK_M), B * nh)
    _flash_fwd_kernel[grid](
        q, k, v, o, lse, T, S, kv_offset, LOG2E / math.sqrt(hs), CAUSAL=causal, **_launch_options(q)
    )
    return o.to(q.dtype), lse


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    kv_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels: (dq, dk, dv) shaped like (q, k, v)."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # (B, nh, T): rowsum(dO * O), FlashAttention-2's D
    dq, dk, dv = (
        torch.full(t.shape, float("nan"), dtype=store_dtype(t.dtype), device=t.device) for t in (q, k, v)
    )
    options = _launch_options(q)
    _flash_bwd_dkdv_kernel[(triton.cdiv(S, BLOCK_N), B * nh)](
        q, k, v, do, lse, delta, dk, dv, T, S, kv_offset, 1.0 / math.sqrt(hs), CAUSAL=causal, **options
    )
    _flash_bwd_dq_kernel[(triton.cdiv(T, BLOCK_M), B * nh)](
        q, k, v, do, lse, delta, dq, T, S, kv_offset, 1.0 / math.sqrt(hs), CAUSAL=causal, **options
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TritonFlashAttention(torch.autograd.Function):
    """Triton forward; Triton backward recomputing P from (Q, K, V, O, LSE)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
    ) -> torch.Tensor:
        q, k, v = (t.contiguous() for t in (q, k, v))  # O(N) copies buy the kernels flat indexing
        kv_offset = k.shape[2] - q.shape[2]  # query i is key position kv_offset + i
        o, lse = _forward(q, k, v, causal, kv_offset)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.kv_offset = causal, kv_offset
        return o

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor) -> tuple:
        q, k, v, o, lse = ctx.saved_tensors
        return (*_backward(q, k, v, o, lse, do, ctx.causal, ctx.kv_offset), None)


def flash_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Triton FlashAttention (B, nh, T, hs) with the GPT backend signature; differentiable."""
    return TritonFlashAttention.apply(q, k, v, causal)


def flash_attention_triton_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: output (B, nh, T, hs) and float32 row log-sum-exp (B, nh, T)."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _forward(q, k, v, causal, k.shape[2] - q.shape[2])


def flash_attention_triton_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) through the Triton forward and backward kernels."""
    return grads_of(flash_attention_triton, q, k, v, causal, dy)
