"""Memory-efficient attention: chunked (Rabe & Staats / xFormers) and split-K decoding (Flash-Decoding).

Both rest on one identity. Attention over a set of keys can be cut into any pieces; each piece
i gives a *normalized* partial output o_i and the log-sum-exp lse_i of its scores, and

    lse = log sum_i exp(lse_i)        o = sum_i exp(lse_i - lse) * o_i

recovers the unsplit result exactly (``combine_partials``, computed relative to max_i lse_i so
that nothing overflows). The pieces are independent:

- ``chunked_attention`` walks query chunks and, inside each, key chunks, merging as it goes:
  peak memory is one (query_chunk, key_chunk) score tile instead of the (T, S) matrix
  ("Self-attention Does Not Need O(n^2) Memory", Rabe & Staats 2021).
- ``split_k_attention`` computes all key chunks at once, as one batched operation, then combines
  them: for decoding (T == 1) over a long KV cache this is the parallelism Flash-Decoding adds
  on a GPU, where one query per head would otherwise leave most of the chip idle.

Ragged batches pass ``key_valid`` (B, S), False = padding key, hidden by the rule of
``impl.gpt.attention.visibility`` (a query still sees its own position). A piece may then hold
no visible key for a row: its partial is (o = 0, lse = -inf) and weighs nothing in the merge.
"""

from __future__ import annotations

import math

import torch

from impl.flash_attention.fast import tile_visibility


def split_bounds(length: int, num_splits: int) -> list[tuple[int, int]]:
    """[start, end) of ``num_splits`` near-equal pieces of range(length) (empty if num_splits > length)."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    return [(i * length // num_splits, (i + 1) * length // num_splits) for i in range(num_splits)]


def softmax_partial(s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized output (..., T, hs) and LSE (..., T) of scores s (..., T, n) over values v (..., n, hs).

    A row that sees none of the n keys (empty piece, or all masked) gets lse = -inf and o = 0,
    so it weighs nothing in ``combine_partials`` instead of spreading NaN.
    """
    if s.shape[-1] == 0:  # an empty piece (more pieces than keys)
        return s.new_zeros(*s.shape[:-1], v.shape[-1]), s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (..., T, 1)
    m = m.masked_fill(m == float("-inf"), 0.0)  # exp(-inf - 0) = 0, not exp(-inf + inf) = NaN
    # exp(s - m), not exp(s - lse): s - m is exact, while lse carries the rounding of its magnitude
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = (p @ v) / torch.where(denom > 0, denom, 1.0)
    return o, (m + torch.log(denom)).squeeze(-1)


def combine_partials(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partials o_parts (n, ..., T, hs), lse_parts (n, ..., T) -> (o (..., T, hs), lse)."""
    m = lse_parts.amax(dim=0)  # (..., T)
    # a row that no piece has seen (chunked attention's running state starts that way) gets
    # weights 0, output 0 and lse -inf, not exp(-inf + inf) = NaN
    m = m.masked_fill(m == float("-inf"), 0.0)
    w = torch.exp(lse_parts - m)  # (n, ..., T): each piece's weight, the largest one is 1
    total = w.sum(dim=0)
    o = (w.unsqueeze(-1) * o_parts).sum(dim=0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return o, m + torch.log(total)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 pieces accumulate in float32


def chunked_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int = 1,
    query_chunk: int = 256,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, nh, T, hs) and LSE (B, nh, T): queries in chunks, keys in ``num_splits`` pieces;
    ``key_valid``: None or bool (B, S) padding mask."""
    B, nh, T, hs = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(hs)
    cdt = _compute_dtype(q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(B, nh, T, dtype=cdt, device=q.device)
    for q0 in range(0, T, query_chunk):
        q1 = min(q0 + query_chunk, T)
        q_blk = q[:, :, q0:q1].to(cdt)  # (B, nh, tq, hs)
        o_run = torch.zeros(B, nh, q1 - q0, hs, dtype=cdt, device=q.device)
        lse_run = torch.full((B, nh, q1 - q0), float("-inf"), dtype=cdt, device=q.device)
        for k0, k1 in split_bounds(S, num_splits):
            s = (q_blk @ k[:, :, k0:k1].to(cdt).transpose(-2, -1)) * scale  # (B, nh, tq, tk)
            visible = tile_visibility(q0, q1, k0, k1, T, S, causal, q.device, key_valid)
            if visible is not None:
                s = s.masked_fill(~visible, float("-inf"))
            o_i, lse_i = softmax_partial(s, v[:, :, k0:k1].to(cdt))
            o_run, lse_run = combine_partials(torch.stack([o_run, o_i]), torch.stack([lse_run, lse_i]))
        o[:, :, q0:q1] = o_run
        lse[:, :, q0:q1] = lse_run
    return o, lse


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int = 1,
    query_chunk: int = 256,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Chunked attention (B, nh, T, hs): O(query_chunk * S / num_splits) memory for the scores;
    ``key_valid``: None or bool (B, S) padding mask."""
    return chunked_attention_with_lse(q, k, v, causal, num_splits, query_chunk, key_valid)[0]


def split_k_partials(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key piece at once: o_parts (n, B, nh, T, hs) and lse_parts (n, B, nh, T), n <= num_splits + 1.

    The first ``n_even * chunk`` keys are a view reshaped to (n_even, chunk) pieces (no copy of
    the cache); the < n_even keys left over, if any, form one last piece. ``key_valid``: None or
    bool (B, S) padding mask.
    """
    if num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    T, hs = q.shape[2], q.shape[3]
    S = k.shape[2]
    n_even = min(num_splits, S)
    chunk = S // n_even
    even = n_even * chunk
    scale = 1.0 / math.sqrt(hs)
    cdt = _compute_dtype(q.dtype)
    q_c = q.to(cdt).unsqueeze(2)  # (B, nh, 1, T, hs)
    k_parts = k[:, :, :even].unflatten(2, (n_even, chunk)).to(cdt)  # (B, nh, n, chunk, hs)
    v_parts = v[:, :, :even].unflatten(2, (n_even, chunk)).to(cdt)
    s = (q_c @ k_parts.transpose(-2, -1)) * scale  # (B, nh, n, T, chunk)
    if key_valid is not None:  # ragged batch: causal (if asked) and valid, or the query's own position
        keys = torch.arange(even, device=q.device).view(n_even, 1, chunk)
        rows = torch.arange(T, device=q.device).view(1, T, 1) + (S - T)
        visible = key_valid[:, :even].to(device=q.device, dtype=torch.bool).view(-1, 1, n_even, 1, chunk)
        if causal:
            visible = visible & (keys <= rows)
        s = s.masked_fill(~(visible | (keys == rows)), float("-inf"))  # (B, 1, n, T, chunk) mask
    elif causal and T > 1:  # a single query (decoding) sees the whole cache
        keys = torch.arange(even, device=q.device).view(n_even, 1, chunk)
        rows = torch.arange(T, device=q.device).view(1, T, 1) + (S - T)
        s = s.masked_fill(keys > rows, float("-inf"))
    o_parts, lse_parts = softmax_partial(s, v_parts)  # (B, nh, n, T, hs), (B, nh, n, T)
    o_parts, lse_parts = o_parts.movedim(2, 0), lse_parts.movedim(2, 0)
    if even < S:
        s = (q.to(cdt) @ k[:, :, even:].to(cdt).transpose(-2, -1)) * scale  # (B, nh, T, S - even)
        visible = tile_visibility(0, T, even, S, T, S, causal, q.device, key_valid)
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        o_tail, lse_tail = softmax_partial(s, v[:, :, even:].to(cdt))
        o_parts = torch.cat([o_parts, o_tail.unsqueeze(0)])
        lse_parts = torch.cat([lse_parts, lse_tail.unsqueeze(0)])
    return o_parts, lse_parts


def split_k_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    num_splits: int = 8,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-K attention (B, nh, T, hs): independent partials over key pieces, then an exact combine;
    ``key_valid``: None or bool (B, S) padding mask."""
    return combine_partials(*split_k_partials(q, k, v, causal, num_splits, key_valid))[0].to(q.dtype)
