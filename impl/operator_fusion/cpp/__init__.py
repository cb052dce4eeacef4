"""The fused C++ CPU ops (``fused_ops.cpp``), compiled at first use with ``torch.utils.cpp_extension``.

The build lands in ``~/.cache/handson-llm/ext/<torch version>/operator_fusion`` (or under
``$HANDSON_EXT_DIR``) and is reused by later processes (ninja rebuilds only when the source
changes). It is compiled for the CPU it runs on (``-march=native``: SIMD GELU and LayerNorm
loops); a home folder shared by machines of different CPUs should set ``$HANDSON_EXT_DIR`` per
machine. No compiler, no build: ``load`` raises a ``RuntimeError`` that names what is missing.

The ops take and return float32 CPU tensors and have no backward (inference kernels); the
signatures match ``impl/operator_fusion/naive.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("fused_ops.cpp")
_module: ModuleType | None = None


def build_dir() -> Path:
    """Where the extension is built: one folder per torch version (the ABI changes between them)."""
    root = Path(os.environ.get("HANDSON_EXT_DIR", Path.home() / ".cache" / "handson-llm" / "ext"))
    return root / f"torch-{torch.__version__}" / "operator_fusion"


def missing_toolchain() -> str | None:
    """Why the extension cannot be built here (a sentence), or None when a compiler and ninja exist."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"the fused C++ ops are compiled at first use by torch.utils.cpp_extension, which needs a C++ "
                f"compiler: {compiler!r} is not on PATH (install g++, e.g. `apt-get install g++`, or point $CXX "
                "at one)")
    if shutil.which("ninja") is None:
        return ("the fused C++ ops are compiled at first use by torch.utils.cpp_extension, which needs ninja: "
                "`ninja` is not on PATH (`pip install ninja` or `apt-get install ninja-build`)")
    return None


def load() -> ModuleType:
    """The compiled extension module (building it on first use); ``RuntimeError`` without a toolchain."""
    global _module
    if _module is None:
        reason = missing_toolchain()
        if reason is not None:
            raise RuntimeError(reason)
        from torch.utils import cpp_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load(name="handson_fused_ops", sources=[str(SOURCE)],
                                     extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                                     build_directory=str(directory), verbose=False)
    return _module


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(x + bias)`` in one pass: x (..., C) float32 CPU, bias (C,) -> (..., C)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return load().bias_gelu(x, bias, approximate == "tanh")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (..., C) float32 CPU, one pass per row."""
    return load().layer_norm(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, LayerNorm(s)) with s = x + residual, one pass per row; x, residual (..., C) float32 CPU."""
    s, y = load().add_layer_norm(x, residual, weight, bias, eps)
    return s, y
