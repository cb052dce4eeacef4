"""Project 22, memory-efficient attention: chunked attention and split-K (Flash-Decoding) decoding.

Importing this package registers the GPT attention backend ``"split_k"``::

    import impl.memory_efficient_attention
    GPT(GPTConfig(attention="split_k"))

One new token (T == 1, decoding with a KV cache) goes through split-K: the Triton kernels on
CUDA, the batched PyTorch version on CPU. Anything longer (prefill, training) goes through
chunked attention, whose score memory is one (query chunk, key chunk) tile.
"""

from __future__ import annotations

import math

import torch

from impl.gpt.attention import register_attention
from impl.memory_efficient_attention.fast import chunked_attention, split_k_attention

DECODE_KEYS_PER_SPLIT = 512  # split-K pieces when decoding
PREFILL_KEYS_PER_CHUNK = 1024  # key chunk of chunked attention (Rabe & Staats use 4096 on TPU)


def split_k_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention (B, nh, T, hs): split-K for a single query, chunked attention otherwise;
    ``key_valid``: None or bool (B, S) padding mask (``impl.gpt.attention.visibility``)."""
    S = k.shape[2]
    if q.shape[2] == 1:
        num_splits = math.ceil(S / DECODE_KEYS_PER_SPLIT)
        if q.is_cuda and key_valid is None:  # the kernels take no padding mask yet: ragged batches use PyTorch
            from impl.memory_efficient_attention.triton import split_k_attention as triton_split_k

            return triton_split_k(q, k, v, causal, num_splits)
        return split_k_attention(q, k, v, causal, num_splits, key_valid)
    return chunked_attention(
        q, k, v, causal, num_splits=math.ceil(S / PREFILL_KEYS_PER_CHUNK), key_valid=key_valid
    )


register_attention("split_k", split_k_backend)
