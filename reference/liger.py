"""Liger Kernel's fused Triton ops (PyPI ``liger-kernel``): the peer our Triton kernels race on CUDA.

Liger ships a LayerNorm, a row softmax and a GELU(tanh)-times-gate (GeGLU) kernel, each with a
fused backward; it has no bias + GELU and no masked softmax, so the speed comparison is on what
both sides have: LayerNorm, plain softmax (scale 1, no mask) and GELU(tanh) (Liger's GeGLU with a
gate of ones: one more read than a plain GELU, said next to the figure). Liger's kernels are
Triton on a GPU: on CPU tensors these functions refuse with the reason (the import works anywhere).
"""

from __future__ import annotations

import torch


def _require_cuda(x: torch.Tensor) -> None:
    if not x.is_cuda:
        raise ValueError("Liger Kernel's ops are Triton kernels for a GPU: pass CUDA tensors")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Liger's LayerNorm over the last dim of x (..., C); differentiable."""
    _require_cuda(x)  # before the import: liger's modules take seconds to load
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return LigerLayerNormFunction.apply(x, weight, bias, eps)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Liger's softmax over the last dim of x; differentiable."""
    _require_cuda(x)  # before the import: liger's modules take seconds to load
    from liger_kernel.ops.softmax import LigerSoftmaxFunction

    return LigerSoftmaxFunction.apply(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU(tanh) of x through Liger's GeGLU kernel, ``gelu(a) * b`` with b = ones (no bias)."""
    _require_cuda(x)  # before the import: liger's modules take seconds to load
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply(x, torch.ones_like(x))
