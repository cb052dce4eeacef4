"""Project 20: sparse attention. Block patterns (``patterns``), a dense masked reference
(``naive``), a block-sparse implementation that computes only kept blocks (``fast``) and a
learnable top-k block pattern (``learned``).

Importing this package registers the GPT attention backend ``"sparse_window"``: causal sliding
window of 2 blocks of 16 tokens plus 1 global block. Other settings come from the factory::

    from impl.gpt.attention import register_attention
    from impl.sparse_attention import sparse_window_attention
    register_attention("sparse_window_512", sparse_window_attention(block_size=64, window=8, n_global=1))
    GPT(GPTConfig(attention="sparse_window_512", ...))
"""

from __future__ import annotations

import torch

from impl.gpt.attention import AttentionFn, register_attention
from impl.sparse_attention import fast, naive
from impl.sparse_attention.patterns import num_blocks, window_layout


def sparse_window_attention(block_size: int = 16, window: int = 2, n_global: int = 1) -> AttentionFn:
    """A GPT attention backend (q, k, v, causal, key_valid=None) -> y: Longformer-style sliding window of
    ``window`` blocks on each side (only earlier ones when causal) plus ``n_global`` global
    blocks, blocks of ``block_size`` tokens.

    A full sequence (T == S) runs block-sparse; queries after a KV cache (T < S) take the last T
    rows of the same pattern through the dense masked path, so prefill and decoding agree.
    """

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        S = k.shape[2]
        layout = window_layout(num_blocks(S, block_size), window, n_global, causal).to(q.device)
        if q.shape[2] == S:
            return fast.sparse_attention(q, k, v, layout, block_size, causal, key_valid=key_valid)
        return naive.sparse_attention(q, k, v, layout, block_size, causal, key_valid=key_valid)

    return attend


register_attention("sparse_window", sparse_window_attention())
