"""KIVI cache, the plain way: dequantize everything cached, then run the model's own attention.

This is what the integer-domain attention of ``fast.py`` must equal (within fp32 rounding). The
functions below feed a key/value stream through a cache in chunks, as decoding does; the spec's
checks call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from impl.gpt.attention import AttentionFn, naive_attention
from impl.gpt.model import call_attention
from impl.kv_quantization.cache import KIVICache


class QuantizedKVCache(KIVICache):
    """KIVI storage whose ``attend`` dequantizes the whole cache and calls ``attend_fn`` on it."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Store the new (B, nh, T, hs) keys/values; attention (B, nh, T, hs) of ``q`` over all cached ones."""
        self.append(layer, k, v)
        k_all, v_all = self.dequantized(layer)  # (B, nh, S, hs): a full-precision copy of the cache
        return call_attention(attend_fn, q, k_all, v_all, key_valid)


def _chunks(chunks: Sequence[int], n: int) -> list[tuple[int, int]]:
    if sum(chunks) != n or any(c < 1 for c in chunks):
        raise ValueError(f"chunk sizes {list(chunks)} must be positive and sum to the {n} tokens of the stream")
    ends = torch.tensor(list(chunks)).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def stream_into(cache: KIVICache, keys: torch.Tensor, values: torch.Tensor, chunks: Sequence[int],
                queries: torch.Tensor | None = None, attend_fn: AttentionFn = naive_attention) -> torch.Tensor | None:
    """Feed (B, nh, N, hs) keys/values into layer 0 of ``cache`` in chunks of ``chunks`` tokens, as decoding
    does; with ``queries`` (B, nh, N, hs), return every chunk's attention output, (B, nh, N, hs)."""
    outs = []
    for start, end in _chunks(chunks, keys.shape[2]):
        k, v = keys[:, :, start:end], values[:, :, start:end]
        if queries is None:
            cache.append(0, k, v)
        else:
            outs.append(cache.attend(0, queries[:, :, start:end], k, v, attend_fn, None))
        cache.advance(end - start)
    return torch.cat(outs, dim=2) if outs else None


def dequantized_stream(keys: torch.Tensor, values: torch.Tensor, chunks: Sequence[int], bits: int,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache holds after the stream, dequantized: keys and values (B, nh, N, hs)."""
    cache = QuantizedKVCache(1, bits, group_size)
    stream_into(cache, keys, values, chunks)
    return cache.dequantized(0)


def attention_stream(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunks: Sequence[int],
                     bits: int, group_size: int) -> torch.Tensor:
    """Causal attention output (B, nh, N, hs) of every chunk's queries over the quantized cache."""
    return stream_into(QuantizedKVCache(1, bits, group_size), keys, values, chunks, queries)


def cache_nbytes(keys: torch.Tensor, values: torch.Tensor, chunks: Sequence[int], bits: int,
                 group_size: int, n_layer: int = 1, cache_cls: type[KIVICache] = QuantizedKVCache) -> int:
    """Bytes a ``cache_cls`` holds after the stream (every layer fed the same stream)."""
    cache = cache_cls(n_layer, bits, group_size)
    for start, end in _chunks(chunks, keys.shape[2]):
        for layer in range(n_layer):
            cache.append(layer, keys[:, :, start:end], values[:, :, start:end])
        cache.advance(end - start)
    return cache.nbytes
