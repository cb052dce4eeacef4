"""The fused CUDA ops (``fused_ops.cu``), built with ``torch.utils.cpp_extension`` only where they can run.

They need a CUDA build of torch, a visible GPU and nvcc; anywhere else ``load`` raises
``CudaUnavailable`` naming what is missing (the benchmarks turn it into an n/a verdict). On this
project's CPU-only torch the source is never compiled.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("fused_ops.cu")
_module: ModuleType | None = None


class CudaUnavailable(RuntimeError):
    """The CUDA ops cannot be built or run on this machine; the message says why."""


def unavailable_reason() -> str | None:
    """Why the CUDA ops cannot run here (a sentence), or None when they can be built."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: the CUDA fused kernels need a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    cuda_home = os.environ.get("CUDA_HOME", "")
    if shutil.which("nvcc") is None and not Path(cuda_home, "bin", "nvcc").exists():
        return "nvcc (the CUDA compiler) is not on PATH nor under $CUDA_HOME/bin"
    return None


def load() -> ModuleType:
    """The compiled CUDA extension (built at first use); ``CudaUnavailable`` where it cannot be."""
    global _module
    if _module is None:
        reason = unavailable_reason()
        if reason is not None:
            raise CudaUnavailable(reason)
        from torch.utils import cpp_extension

        from impl.operator_fusion.cpp import build_dir

        directory = build_dir().with_name("operator_fusion_cuda")
        directory.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load(name="handson_fused_ops_cuda", sources=[str(SOURCE)],
                                     extra_cuda_cflags=["-O3"], build_directory=str(directory), verbose=False)
    return _module


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) in one CUDA kernel: x (..., C), bias (C,)."""
    return load().bias_gelu(x, bias)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LayerNorm(s)) with s = x + residual in one CUDA kernel (rows of at most 4096)."""
    s, y = load().add_layer_norm(x, residual, weight, bias, eps)
    return s, y
