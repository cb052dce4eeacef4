"""FlashAttention in plain PyTorch: tiles, online softmax, and a backward pass by recomputation.

The (T, S) score matrix never exists. For each block of queries we walk the blocks of keys
and keep three running quantities per query row: the largest score seen so far ``m``, the sum
of exponentials ``denom`` (relative to ``m``; the paper's l) and the un-normalized output
``acc``. When a new key block raises the maximum, what was accumulated under the old one is
rescaled by ``exp(m_old - m_new)`` (online softmax, Milakov & Gimelshein 2018; FlashAttention
Alg. 1). Memory is O(block_q * block_k) per step instead of O(T * S).

The backward pass stores no probabilities either: it keeps Q, K, V, O and the row log-sum-exp
``lse = m + log(denom)`` and recomputes each tile of P = exp(S - lse) on the fly
(FlashAttention-2, Alg. 2). Tiles are computed in float32 even for bf16/fp16 inputs, as the
CUDA kernels do.

Ragged batches pass ``key_valid`` (B, S): every tile is then masked by the rule of
``impl.gpt.attention.visibility`` (causal, key valid, or the query's own position). A padding
key can hide a whole tile from a row (left padding: the first tiles), so the running maximum
starts at the lowest finite value instead of -inf on that path: exp(s - m) of a row that has
seen nothing yet is then exp(-inf) = 0, never exp(-inf + inf) = NaN. Without ``key_valid``
nothing changes: key 0 is visible to every query, so the first tile already makes m finite.
"""

from __future__ import annotations

import math

import torch

from impl.flash_attention.naive import grads_of

BLOCK_Q = 128
BLOCK_K = 128


def key_block_starts(q_start: int, q_end: int, T: int, S: int, causal: bool, block_k: int) -> range:
    """First key of every key block the queries [q_start, q_end) must visit."""
    # with a causal mask the last query of the block sees keys up to S - T + q_end - 1:
    # blocks past that are skipped entirely, which is where causal attention saves half the work
    stop = min(S, S - T + q_end) if causal else S
    return range(0, stop, block_k)


def tile_visibility(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    T: int,
    S: int,
    causal: bool,
    device: torch.device,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask of the tile, or None when all of it is visible: (q_end - q_start, k_end - k_start)
    without ``key_valid``, (B, 1, q_end - q_start, k_end - k_start) with it (bool (B, S), False =
    padding key: hidden unless it is the query's own position, as in ``impl.gpt.attention.visibility``).
    """
    if key_valid is None and (not causal or k_end - 1 <= S - T + q_start):
        return None  # no padding, and the whole tile lies below the diagonal
    rows = torch.arange(q_start, q_end, device=device).unsqueeze(1) + (S - T)
    cols = torch.arange(k_start, k_end, device=device).unsqueeze(0)
    if key_valid is None:
        return cols <= rows
    allowed = key_valid[:, None, None, k_start:k_end].to(device=device, dtype=torch.bool)  # (B, 1, 1, bk)
    if causal:
        allowed = allowed & (cols <= rows)
    return allowed | (cols == rows)  # a padding query still sees itself: no softmax over nothing


def tile_scores(
    q_blk: torch.Tensor, k_blk: torch.Tensor, scale: float, visible: torch.Tensor | None
) -> torch.Tensor:
    """Scaled scores (B, nh, bq, bk) of one tile, -inf where ``visible`` (broadcastable) hides a key."""
    s = (q_blk @ k_blk.transpose(-2, -1)) * scale
    return s if visible is None else s.masked_fill(~visible, float("-inf"))


def online_softmax_step(
    m: torch.Tensor, denom: torch.Tensor, acc: torch.Tensor, s: torch.Tensor, v_blk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of scores ``s`` (B, nh, bq, bk) and values (B, nh, bk, hs) into (m, denom, acc).

    ``m`` is the running row maximum, ``denom`` the running sum of exp(s - m) (the paper's l).
    ``m`` must be finite once a row has seen a key tile: it starts at -inf only when key 0 is
    visible to every query; with padding keys ``flash_forward`` starts it at the lowest finite value.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))  # (B, nh, bq); finite (see above)
    p = torch.exp(s - m_new.unsqueeze(-1))  # (B, nh, bq, bk)
    alpha = torch.exp(m - m_new)  # shrinks what was summed under the old, smaller maximum
    denom = alpha * denom + p.sum(dim=-1)
    acc = alpha.unsqueeze(-1) * acc + p @ v_blk  # (B, nh, bq, hs)
    return m_new, denom, acc


def row_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """D_i = sum_j P_ij dP_ij = rowsum(dO * O) (B, nh, T): the softmax backward's correction term."""
    return (o * do).sum(dim=-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 tiles accumulate in float32 (as the CUDA kernels do); float64 stays float64
    return torch.promote_types(dtype, torch.float32)


def flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, nh, T, hs) in q's dtype and float32 row log-sum-exp (B, nh, T), tile by tile.

    ``key_valid``: None or bool (B, S), False = padding key (``impl.gpt.attention.visibility``).
    """
    B, nh, T, hs = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    cdt = _compute_dtype(q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, nh, T, dtype=cdt, device=q.device)
    # with padding a row may see nothing in its first tiles: a finite start keeps exp(s - m) = 0 there
    m_start = float("-inf") if key_valid is None else torch.finfo(cdt).min
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        q_blk = q[:, :, q0:q1].to(cdt)  # (B, nh, bq, hs)
        m = torch.full((B, nh, q1 - q0), m_start, dtype=cdt, device=q.device)
        denom = torch.zeros_like(m)
        acc = torch.zeros(B, nh, q1 - q0, hs, dtype=cdt, device=q.device)
        for k0 in key_block_starts(q0, q1, T, S, causal, block_k):
            k1 = min(k0 + block_k, S)
            visible = tile_visibility(q0, q1, k0, k1, T, S, causal, q.device, key_valid)
            s = tile_scores(q_blk, k[:, :, k0:k1].to(cdt), scale, visible)
            m, denom, acc = online_softmax_step(m, denom, acc, s, v[:, :, k0:k1].to(cdt))
        o[:, :, q0:q1] = acc / denom.unsqueeze(-1)
        lse[:, :, q0:q1] = m + torch.log(denom)
    return o, lse


def flash_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the saved Q, K, V, O, LSE: P is recomputed one tile at a time, under the
    same mask as the forward (``key_valid`` included: hidden keys get p = exp(-inf - lse) = 0)."""
    T, hs = q.shape[2], q.shape[3]
    S = k.shape[2]
    scale = 1.0 / math.sqrt(hs) if scale is None else scale
    cdt = _compute_dtype(q.dtype)
    delta = row_delta(o.to(cdt), do.to(cdt))  # (B, nh, T)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    # queries outer, keys inner: sequential here, so dk/dv need no atomics (the GPU kernel
    # swaps the loops so that each program owns one key block's dk, dv)
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        q_blk, do_blk = q[:, :, q0:q1].to(cdt), do[:, :, q0:q1].to(cdt)  # (B, nh, bq, hs)
        lse_blk, delta_blk = lse[:, :, q0:q1].unsqueeze(-1), delta[:, :, q0:q1].unsqueeze(-1)
        for k0 in key_block_starts(q0, q1, T, S, causal, block_k):
            k1 = min(k0 + block_k, S)
            k_blk, v_blk = k[:, :, k0:k1].to(cdt), v[:, :, k0:k1].to(cdt)  # (B, nh, bk, hs)
            visible = tile_visibility(q0, q1, k0, k1, T, S, causal, q.device, key_valid)
            p = torch.exp(tile_scores(q_blk, k_blk, scale, visible) - lse_blk)  # (B, nh, bq, bk)
            dv[:, :, k0:k1] += p.transpose(-2, -1) @ do_blk
            ds = p * (do_blk @ v_blk.transpose(-2, -1) - delta_blk)  # softmax backward, one tile
            dq[:, :, q0:q1] += (ds @ k_blk) * scale
            dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ q_blk) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled forward; the backward recomputes P from (Q, K, V, O, LSE) instead of storing it."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        o, lse = flash_forward(q, k, v, causal, key_valid=key_valid)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.key_valid = causal, key_valid
        return o

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor) -> tuple:
        q, k, v, o, lse = ctx.saved_tensors
        return (*flash_backward(q, k, v, o, lse, do, ctx.causal, key_valid=ctx.key_valid), None, None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Tiled attention (B, nh, T, hs) with the GPT backend signature; differentiable."""
    return FlashAttentionFunction.apply(q, k, v, causal, key_valid)


def flash_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: output (B, nh, T, hs) and row log-sum-exp (B, nh, T)."""
    return flash_forward(q, k, v, causal, key_valid=key_valid)


def flash_attention_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    dy: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) through the tiled forward and its recomputing backward."""
    return grads_of(flash_attention, q, k, v, causal, dy, key_valid)
