"""Project 9, FlashAttention: tiled attention with an online softmax, in PyTorch and in Triton.

Importing this package registers two GPT attention backends::

    import impl.flash_attention
    GPT(GPTConfig(attention="flash"))          # tiled PyTorch (fast.py), forward and backward
    GPT(GPTConfig(attention="flash_triton"))   # Triton kernels (triton.py): CUDA, or CPU in the
                                               # interpreter with TRITON_INTERPRET=1
"""

from __future__ import annotations

import torch

from impl.flash_attention.fast import flash_attention
from impl.gpt.attention import register_attention


def flash_triton_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton FlashAttention kernels (B, nh, T, hs), imported on first use."""
    if key_valid is not None:  # the kernels take no padding mask yet: ragged batches run the tiled PyTorch path
        return flash_attention(q, k, v, causal, key_valid)
    # imported here, not at the top: triton reads TRITON_INTERPRET when the kernels are defined,
    # and a CPU-only user of the "flash" backend should not need triton at all
    from impl.flash_attention.triton import flash_attention_triton

    return flash_attention_triton(q, k, v, causal)


register_attention("flash", flash_attention)
register_attention("flash_triton", flash_triton_attention)
