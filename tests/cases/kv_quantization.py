"""Cases for project 15: key/value streams arriving in chunks, an independent KIVI oracle, the attention
error bound and the bytes formula.

The oracle is written here directly with torch (no impl/ptq/quant.py): an asymmetric grid of
``2^bits`` codes per group, range widened to hold 0, ``scale = (max - min) / (2^bits - 1)``,
``zero = round(-min / scale)``, codes ``clamp(round(x / scale) + zero)``, value ``(code - zero) * scale``;
keys grouped per channel over each run of G tokens, values per token over the head dim, the last
``N mod G`` tokens kept exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases

EPS = torch.finfo(torch.float32).eps


def _fake_quant(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded to its asymmetric grid, the grid's step broadcast like x), one grid per slice along ``dim``."""
    qmax = 2**bits - 1
    lo = x.amin(dim, keepdim=True).clamp(max=0)
    hi = x.amax(dim, keepdim=True).clamp(min=0)
    step = ((hi - lo) / qmax).clamp(min=EPS)
    zero = (-torch.round(lo / step)).clamp(0, qmax)
    codes = (torch.round(x / step) + zero).clamp(0, qmax)
    return (codes - zero) * step, step.expand_as(x)


def oracle(keys: torch.Tensor, values: torch.Tensor, bits: int, group_size: int):
    """(keys, values, key steps, value steps), each (B, nh, N, hs) fp32: what a KIVI cache of the whole
    stream stands for, and the quantization step of every element (0 in the exact residual)."""
    keys, values = keys.float(), values.float()
    B, nh, N, hs = keys.shape
    full = N // group_size * group_size
    k_hat, v_hat = keys.clone(), values.clone()
    k_step, v_step = torch.zeros_like(keys), torch.zeros_like(values)
    if full:
        groups = keys[:, :, :full].reshape(B, nh, full // group_size, group_size, hs)
        kq, ks = _fake_quant(groups, 3, bits)  # per channel: min/max over the group's tokens
        k_hat[:, :, :full], k_step[:, :, :full] = kq.reshape(B, nh, full, hs), ks.reshape(B, nh, full, hs)
        v_hat[:, :, :full], v_step[:, :, :full] = _fake_quant(values[:, :, :full], 3, bits)  # per token
    return k_hat, v_hat, k_step, v_step


def bytes_formula(batch: int, n_head: int, tokens: int, head_dim: int, bits: int, group_size: int,
                  n_layer: int = 1, residual_bytes: int = 4) -> int:
    """Bytes of a KIVI cache holding ``tokens``: codes (bits/8 per element, int4 rows padded to whole bytes),
    an fp32 scale and a uint8 zero point per key channel per group and per value token, plus the exact
    residual (``tokens mod G`` keys and values at ``residual_bytes`` each)."""
    groups, residual = divmod(tokens, group_size)
    q_tokens = groups * group_size
    key_codes = groups * head_dim * math.ceil(group_size * bits / 8)
    value_codes = q_tokens * math.ceil(head_dim * bits / 8)
    key_params = groups * head_dim * (4 + 1)
    value_params = q_tokens * (4 + 1)
    res = 2 * residual * head_dim * residual_bytes
    return n_layer * batch * n_head * (key_codes + value_codes + key_params + value_params + res)


def stream_case(seed: int, batch: int, n_head: int, tokens: int, head_dim: int, bits: int, group_size: int,
                cuts: list[int] | None = None, outlier_channels: int = 1, zero_keys: bool = False,
                id: str | None = None) -> dict[str, Any]:
    """Random queries/keys/values (B, nh, N, hs) with a few large key channels (KIVI's key outliers),
    arriving in chunks cut at ``cuts`` (token positions; None: one token at a time)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n_head, tokens, head_dim, generator=gen) for _ in range(3))
    k[..., :outlier_channels] *= 8.0
    if zero_keys:
        k.zero_()
    bounds = sorted({c for c in (cuts if cuts is not None else range(1, tokens)) if 0 < c < tokens})
    chunks = [b - a for a, b in zip([0, *bounds], [*bounds, tokens], strict=True)]
    case = {"queries": q, "keys": k, "values": v, "chunks": chunks, "bits": bits, "group_size": group_size}
    return case | ({"id": id} if id else {})


_EDGE = [
    stream_case(0, 1, 1, 1, 8, 8, 4, id="one-token"),
    stream_case(1, 1, 2, 3, 8, 8, 4, id="residual-only"),
    stream_case(2, 2, 2, 16, 8, 8, 16, cuts=[], id="one-full-group-in-one-prefill"),
    stream_case(3, 1, 2, 40, 16, 8, 8, id="token-by-token-int8"),
    stream_case(4, 1, 2, 40, 16, 4, 8, id="token-by-token-int4"),
    stream_case(5, 2, 3, 77, 16, 8, 8, cuts=[10, 11, 12, 42, 47], id="ragged-chunks"),
    stream_case(6, 2, 1, 70, 6, 4, 32, cuts=[33], id="int4-odd-packing-rows"),
    stream_case(7, 1, 2, 24, 8, 8, 8, zero_keys=True, id="all-zero-keys"),
    stream_case(8, 1, 4, 130, 64, 8, 32, cuts=[100], id="bpe-base-head-dim"),
]

_STRATEGY = st.builds(
    stream_case,
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    n_head=st.integers(1, 3),
    tokens=st.integers(1, 80),
    head_dim=st.sampled_from([2, 4, 6, 8, 16]),
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([2, 4, 8, 16, 32]),
    cuts=st.one_of(st.none(), st.lists(st.integers(1, 79), max_size=8)),
    outlier_channels=st.integers(0, 2),
)

streams = Cases(edge=_EDGE, strategy=_STRATEGY)


def _without_queries(case: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in case.items() if k != "queries"}


stored_streams = Cases(edge=[_without_queries(c) for c in _EDGE], strategy=_STRATEGY.map(_without_queries))


def matches_oracle(fn, keys, values, chunks, bits, group_size) -> None:
    """The cache's dequantized keys/values equal the oracle's, whatever the chunking (one code off is a
    whole step: far outside the float tolerance)."""
    k_hat, v_hat = fn(keys, values, chunks, bits, group_size)
    k_ref, v_ref, _, _ = oracle(keys, values, bits, group_size)
    for name, got, ref in (("keys", k_hat, k_ref), ("values", v_hat, v_ref)):
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, oracle {tuple(ref.shape)}"
        tol = 1e-6 * (1 + ref.abs().max().item())
        err = (got.float() - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= tol, f"dequantized {name} differ from the oracle by {err:.3g} (> {tol:.3g})"


def attention_error_bound(queries, keys, values, bits, group_size) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 causal attention (B, nh, N, hs), its error bound (B, nh, N, 1)) for the quantized cache.

    Every key element is off by at most its step (round to nearest is half a step; the clamp at the
    grid's top edge can add the other half), so a score moves by at most
    ``delta = sum_d |q_d| max_j step_k[j, d] / sqrt(hs)``; each softmax weight then moves by a factor in
    [e^-2delta, e^2delta], so the weights move by at most ``e^(2 delta) - 1`` in total (L1) and the output
    by that times ``max |v|``; the values add at most their largest step. Plus 1e-5 for fp32 rounding."""
    q, k, v = queries.float(), keys.float(), values.float()
    hs = q.shape[-1]
    _, _, k_step, v_step = oracle(k, v, bits, group_size)
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    att = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~mask, float("-inf")).softmax(-1)
    y = att @ v
    delta = (q.abs() * k_step.amax(dim=2, keepdim=True)).sum(-1, keepdim=True) / math.sqrt(hs)  # (B, nh, N, 1)
    v_max = v.abs().amax(dim=(2, 3), keepdim=True)
    bound = torch.expm1(2 * delta) * v_max + v_step.amax(dim=(2, 3), keepdim=True) + 1e-5
    return y, bound


def attention_within_bound(fn, queries, keys, values, chunks, bits, group_size) -> None:
    """Every output row of the quantized cache's attention is within ``attention_error_bound`` of fp32."""
    y_hat = fn(queries, keys, values, chunks, bits, group_size)
    y, bound = attention_error_bound(queries, keys, values, bits, group_size)
    assert y_hat.shape == y.shape, f"output shape {tuple(y_hat.shape)}, expected {tuple(y.shape)}"
    err = (y_hat.float() - y).abs().amax(dim=-1, keepdim=True)
    worst = (err / bound).max().item()
    assert worst <= 1, f"attention error reaches {worst:.3g}x its quantization-step bound"


def bytes_match_formula(fn, keys, values, chunks, bits, group_size) -> None:
    """The cache's nbytes after the stream equals ``bytes_formula``, for 1 and 3 layers."""
    B, nh, N, hs = keys.shape
    for n_layer in (1, 3):
        got = fn(keys, values, chunks, bits, group_size, n_layer)
        want = bytes_formula(B, nh, N, hs, bits, group_size, n_layer, keys.element_size())
        assert got == want, f"{n_layer} layers: cache holds {got} bytes, the formula says {want}"
