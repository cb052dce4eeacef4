"""Mutants of project 15's quantized KV cache: each breaks one thing the spec's checks must notice."""

from __future__ import annotations

import torch

from impl.kv_quantization import fast, naive
from impl.ptq.quant import dequantize


class _KeysPerToken(naive.QuantizedKVCache):
    """Keys quantized like values, one grid per token, where KIVI means one per channel."""

    def quantize_keys(self, k):
        return self.quantize_values(k)

    def dequantized(self, layer):
        st = self.layers[layer]
        if st.k_codes is None:
            return st.k_res, st.v_res
        hs = st.k_res.shape[-1]
        k, v = (dequantize(self.codes(codes, hs), scale[..., None], zero[..., None].float(), self.scheme,
                           st.k_res.dtype)
                for codes, scale, zero in ((st.k_codes, st.k_scale, st.k_zero), (st.v_codes, st.v_scale, st.v_zero)))
        return torch.cat([k, st.k_res], dim=2), v


def keys_scaled_per_token(keys, values, chunks, bits, group_size):
    cache = _KeysPerToken(1, bits, group_size)
    naive.stream_into(cache, keys, values, chunks)
    return cache.dequantized(0)


def residual_never_quantized(keys, values, chunks, bits, group_size):
    """The residual never fills: every token stays in full precision."""
    return naive.dequantized_stream(keys, values, chunks, bits, group_size=2 * keys.shape[2] + 2)


class _UnscaledScores(fast.QuantizedKVCache):
    def key_scores(self, st, q):
        B, nh, T, _ = q.shape
        kc = self.codes(st.k_codes, self.group_size).float()  # (B, nh, g, hs, G)
        s = q[:, :, None] @ kc  # the codes' dot product, scales never applied
        return s.permute(0, 1, 3, 2, 4).reshape(B, nh, T, -1)


class _ZeroPointDropped(fast.QuantizedKVCache):
    def key_scores(self, st, q):
        saved = st.k_zero
        st.k_zero = torch.zeros_like(saved)  # as if the grid were symmetric: no correction term
        try:
            return super().key_scores(st, q)
        finally:
            st.k_zero = saved


def unscaled_dot_product(queries, keys, values, chunks, bits, group_size):
    return naive.stream_into(_UnscaledScores(1, bits, group_size), keys, values, chunks, queries)


def zero_point_dropped(queries, keys, values, chunks, bits, group_size):
    return naive.stream_into(_ZeroPointDropped(1, bits, group_size), keys, values, chunks, queries)


class _BytesWithoutScales(naive.QuantizedKVCache):
    @property
    def nbytes(self):
        return sum(t.nbytes for st in self.layers for t in (st.k_codes, st.v_codes, st.k_res, st.v_res)
                   if t is not None)


def bytes_without_scales(keys, values, chunks, bits, group_size, n_layer=1):
    return naive.cache_nbytes(keys, values, chunks, bits, group_size, n_layer, cache_cls=_BytesWithoutScales)


def bytes_residual_never_quantized(keys, values, chunks, bits, group_size, n_layer=1):
    return naive.cache_nbytes(keys, values, chunks, bits, 2 * keys.shape[2] + 2, n_layer)
