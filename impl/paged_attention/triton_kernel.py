"""Paged attention as a Triton kernel: each program owns one (sequence, head, tile of queries) and
walks that sequence's block table, loading one KV block at a time straight from the pool (no gather
copy) and folding it into an online softmax (running max ``m``, running sum ``denom``, rescaled
accumulator ``acc``), as FlashAttention does over tiles.

The score and output products are broadcast multiply-and-sum rather than ``tl.dot``: decoding has one
query per sequence, a matrix-vector product that tensor cores do not help (vLLM's v1 kernel reasons
the same way), and it keeps any block size and head size legal (``tl.dot`` wants >= 16). Everything
is accumulated in float32, which also sidesteps the interpreter's wrong bf16 ``tl.dot``.

On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by the tests); on CUDA
natively. Same contract as ``fast.paged_attention``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, T, max_blocks, scale,
                            NH: tl.constexpr, HS: tl.constexpr, BS: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)  # query indices of this tile
    dims = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, BLOCK_S)
    length = tl.load(lengths_ptr + b)
    query_pos = length - T + rows  # bottom-right causal alignment
    q_mask = (rows < T)[:, None] & (dims < HS)[None, :]
    q = tl.load(q_ptr + ((b * NH + h) * T + rows[:, None]) * HS + dims[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale
    m = tl.full([BLOCK_T], -1.0e30, tl.float32)  # finite: a tile a row cannot see adds exp(-inf) = 0, no NaN
    denom = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    kv_mask = (slots < BS)[:, None] & (dims < HS)[None, :]
    for j in range(0, tl.cdiv(length, BS)):
        block = tl.load(tables_ptr + b * max_blocks + j)  # the block table: logical j -> physical block
        offsets = ((block * NH + h) * BS + slots[:, None]) * HS + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)  # (BLOCK_S, BLOCK_D)
        v = tl.load(v_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (BLOCK_T, BLOCK_S)
        key_pos = j * BS + slots
        visible = (key_pos[None, :] <= query_pos[:, None]) & (slots < BS)[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)  # rescale what was summed under the old maximum
        p = tl.exp(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + ((b * NH + h) * T + rows[:, None]) * HS + dims[None, :], out, mask=q_mask)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Causal attention (B, nh, T, hs) over paged keys/values, by the Triton kernel (float32 inside,
    returned in ``q``'s dtype)."""
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError("the Triton paged attention needs a GPU, or TRITON_INTERPRET=1 to run on CPU")
    B, nh, T, hs = q.shape
    bs = k_pool.shape[2]
    q, k_pool, v_pool = (t.contiguous() for t in (q, k_pool, v_pool))
    tables = block_tables.to(torch.int64).contiguous()
    lengths = lengths.to(torch.int64).contiguous()
    out = torch.empty((B, nh, T, hs), dtype=torch.float32, device=q.device)
    block_t = min(triton.next_power_of_2(T), 16)
    grid = (B, nh, triton.cdiv(T, block_t))
    _paged_attention_kernel[grid](q, k_pool, v_pool, tables, lengths, out, T, tables.shape[1], 1.0 / math.sqrt(hs),
                                  NH=nh, HS=hs, BS=bs, BLOCK_T=block_t, BLOCK_S=triton.next_power_of_2(bs),
                                  BLOCK_D=triton.next_power_of_2(hs))
    return out.to(q.dtype)
