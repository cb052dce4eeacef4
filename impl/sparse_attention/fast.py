"""Block-sparse attention: compute only the key blocks the pattern keeps.

For each query block we gather its kept key/value blocks into a dense (width * b, hs) slab and
run batched matmuls over many query blocks at once. Rows keep different numbers of blocks, so
each row is padded to a common ``width`` with a validity mask. Time and memory are
O(T * width * b) instead of O(T^2): linear in T for a window pattern, whose width is constant.

One global row (Longformer: a global block sees every block) would force ``width = n`` on every
row and bring O(T^2) back, so rows are split into (at most) two buckets, each padded only to
its own widest row: the few wide rows cost O(T) each, the many narrow rows O(width).
Within a bucket, query-block rows go a chunk at a time, so the gathered keys and the score slab
stay cache-sized whatever T is: beyond the inputs, memory is the O(T) output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from impl.sparse_attention.patterns import check_layout, num_blocks

SLAB_ELEMENTS = 2**21  # scores computed at once: 8 MiB in fp32


def row_buckets(counts: torch.Tensor) -> list[torch.Tensor]:
    """Split query-block rows, given their kept-block ``counts`` (n,), into at most two sorted
    groups of row indices so that padding each group to its widest row computes the fewest blocks."""
    order = torch.argsort(counts, stable=True)
    c, n = counts[order].tolist(), len(counts)
    # padded work when the s narrowest rows form one bucket and the rest another
    split = min(range(1, n + 1), key=lambda s: s * c[s - 1] + (n - s) * c[-1])
    # a second bucket has its own gathers and kernel calls: split only when it saves > 1/8 of the work
    if split * c[split - 1] + (n - split) * c[-1] > 0.875 * n * c[-1]:
        split = n
    buckets = [order[:split], order[split:]] if split < n else [order]
    return [bucket.sort().values for bucket in buckets]


def _attend_rows(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    layout: torch.Tensor,
    rows: torch.Tensor,
    width: int,
    seq_len: int,
    causal: bool,
    block_bias: torch.Tensor | None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (B, nh, r, b, hs) for the query blocks ``rows`` (r,), each against its
    kept key blocks only, padded to ``width`` blocks. qb, kb, vb: (B, nh, n, b, hs);
    ``key_valid``: None or bool (B, n * b), False = padding key (hidden unless it is the query's own)."""
    B, nh, n, b, hs = qb.shape
    r = len(rows)
    row_layout = layout.index_select(2, rows)  # (LB, Lh, r, n), LB in {1, B}, Lh in {1, nh}
    # index of every kept key block, kept ones first (a stable sort puts True before False),
    # cut to the row width: slots past a row's own count point at unkept blocks, masked below
    idx = torch.sort(row_layout.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    idx = idx[..., :width]  # (LB, Lh, r, width)
    valid = row_layout.gather(-1, idx)  # (LB, Lh, r, width)

    # gather only the kept blocks, as rows of the flattened (B * nh * n, b, hs) block list:
    # index_select copies whole blocks, much faster than broadcast advanced indexing
    head_offset = torch.arange(B * nh, device=qb.device).view(B, nh, 1, 1) * n
    flat = (head_offset + idx).flatten()  # (B * nh * r * width,)
    k_kept = kb.reshape(B * nh * n, b, hs).index_select(0, flat).view(B, nh, r, width * b, hs)
    v_kept = vb.reshape(B * nh * n, b, hs).index_select(0, flat).view(B, nh, r, width * b, hs)

    q_rows = qb.index_select(2, rows).mul_(1.0 / math.sqrt(hs))  # (B, nh, r, b, hs); scale q, not scores
    scores = q_rows @ k_kept.transpose(-2, -1)  # (B, nh, r, b, width * b)
    if block_bias is not None:
        bias = block_bias.expand(B, nh, n, n)[:, :, rows].gather(-1, idx.expand(B, nh, r, width))
        scores = scores + bias.repeat_interleave(b, dim=-1).unsqueeze(-2)  # (B, nh, r, 1, width * b)

    # token-level mask of what to drop: padding slots, keys past the end, the causal future
    drop = ~valid.repeat_interleave(b, dim=-1)  # (LB, Lh, r, width * b)
    if causal or seq_len % b or key_valid is not None:
        key_pos = (idx.unsqueeze(-1) * b + torch.arange(b, device=qb.device)).flatten(-2)  # like drop
        if seq_len % b:
            drop |= key_pos >= seq_len
    if key_valid is not None:  # padding keys, read at each slot's key position: (B, Lh, r, width * b)
        Lh = key_pos.shape[1]
        slot_valid = key_valid.view(B, 1, 1, -1).expand(B, Lh, r, -1).gather(-1, key_pos.expand(B, Lh, r, -1))
        drop = drop | ~slot_valid
    drop = drop.unsqueeze(-2)  # (LB or B, Lh, r, 1, width * b)
    if causal or key_valid is not None:
        query_pos = rows.view(r, 1) * b + torch.arange(b, device=qb.device)  # (r, b)
    if causal:
        drop = drop | (key_pos.unsqueeze(-2) > query_pos.unsqueeze(-1))  # (LB, Lh, r, b, width * b)
    if key_valid is not None:
        # a query always sees its own position (in its diagonal block, a kept slot): no empty rows,
        # not even for the zero-padded queries past seq_len, whose NaN would leak into v's gradient
        drop = drop & (key_pos.unsqueeze(-2) != query_pos.unsqueeze(-1))
    weights = torch.softmax(scores.masked_fill_(drop, float("-inf")), dim=-1)  # in place: one slab less
    return weights @ v_kept  # (B, nh, r, b, hs)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block_size: int,
    causal: bool,
    block_bias: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as ``naive.sparse_attention`` for self-attention (T == S), computing only the
    kept blocks. q, k, v: (B, nh, T, hs); ``layout`` bool (n, n) or (B, nh, n, n), with
    n = ceil(T / block_size); ``block_bias`` broadcastable to (B, nh, n, n); ``key_valid`` None or
    bool (B, T), False = padding key. Returns (B, nh, T, hs).
    """
    B, nh, T, hs = q.shape
    if k.shape[2] != T:
        raise ValueError(
            f"block-sparse attention is self-attention (T == S), got T={T} queries and S={k.shape[2]} "
            "keys; use naive.sparse_attention for queries after a KV cache"
        )
    b = block_size
    n = num_blocks(T, b)
    check_layout(layout, n)
    layout = layout.to(q.device)
    # pad to whole blocks: padded keys are masked in _attend_rows, padded queries dropped at the end
    pad = n * b - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    if key_valid is not None:
        key_valid = F.pad(key_valid.to(device=q.device, dtype=torch.bool), (0, pad))  # (B, n * b)
    qb, kb, vb = (t.reshape(B, nh, n, b, hs) for t in (q, k, v))  # (B, nh, n, b, hs)
    layout = layout.reshape((1,) * (4 - layout.dim()) + tuple(layout.shape))  # (LB, Lh, n, n)
    # (n,) kept key blocks per query-block row, worst head; a slice of rows at a time, because
    # sum() widens bools to int64: 8 bytes per layout entry would be the one O(n^2) buffer here
    counts = torch.cat([rows.sum(-1).amax(dim=(0, 1)) for rows in layout.split(1024, dim=2)])
    y = torch.full_like(qb, float("nan"))  # NaN-filled: a row no chunk wrote would show
    for bucket in row_buckets(counts):
        width = int(counts[bucket].max())
        # a chunk of query-block rows at a time: each chunk's score slab stays near SLAB_ELEMENTS
        # (cache-sized), so the working set no longer grows with T: only y does
        chunk = max(1, SLAB_ELEMENTS // (B * nh * b * width * b))
        for rows in bucket.split(chunk):
            y_rows = _attend_rows(qb, kb, vb, layout, rows, width, T, causal, block_bias, key_valid)
            y.index_copy_(2, rows, y_rows)
    return y.reshape(B, nh, n * b, hs)[:, :, :T]
