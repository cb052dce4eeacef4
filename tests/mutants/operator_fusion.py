"""Mutants of project 25: each fused op with one classic slip, launched through the real kernels.

The issue's three (a variance without the epsilon, GELU's erf form where the tanh form is meant,
the residual added after the norm instead of before it) for the Triton kernels, the C++ ops and
the fused GPT, plus the slips a backward or a softmax makes: gradients through a 1/std computed
without eps, a GELU backward of the erf form, the residual stream's own gradient dropped, a
causal mask aligned top-left, the softmax scale forgotten in the backward, and a trace that
holds stale weights.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from impl.gpt.model import GPT
from impl.operator_fusion import model as fusion_model
from impl.operator_fusion.naive import grads_of


def _tk() -> ModuleType:
    from impl.operator_fusion import triton_kernels  # lazily: TRITON_INTERPRET must be set first

    return triton_kernels


def _cpp() -> ModuleType:
    from impl.operator_fusion import cpp

    return cpp


# ------------------------------------------------------------------ Triton forward


def triton_erf_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fused kernel in GELU's exact (erf) form where GPT-2's tanh form is meant."""
    return _tk().bias_gelu(x, bias, approximate="none")


def triton_layer_norm_without_eps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  eps: float = 1e-5) -> torch.Tensor:
    """1 / sqrt(var) instead of 1 / sqrt(var + eps)."""
    return _tk().layer_norm(x, weight, bias, 0.0)


def triton_add_layer_norm_without_eps(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                      bias: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + LayerNorm with the variance's epsilon dropped."""
    return _tk().add_layer_norm(x, residual, weight, bias, 0.0)


def triton_residual_after_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(x) + residual where LayerNorm(x + residual) is meant."""
    return x + residual, _tk().layer_norm(x, weight, bias, eps) + residual


def triton_softmax_top_left(scores: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """The softmax kernel launched with a causal mask aligned top-left (wrong when T < S)."""
    T, S = scores.shape[-2:]
    return _tk()._softmax_forward(scores.reshape(-1, S).contiguous(), T, 0, scale, causal).view(scores.shape)


# ------------------------------------------------------------------ Triton backward


class _LayerNormRstdWithoutEps(torch.autograd.Function):
    """Right forward; the 1/std saved for the backward computed without eps."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = _tk()._layer_norm_forward(x2, None, weight, bias, eps)[0]
        _, _, mean, rstd = _tk()._layer_norm_forward(x2, None, weight, bias, 0.0)
        ctx.save_for_backward(x2, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _tk()._layer_norm_backward(x2, weight, mean, rstd, dy.reshape(x2.shape), None)
        return dx.view(dy.shape), dw, db, None


def triton_layer_norm_grads_without_eps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                        dy: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """LayerNorm gradients through a 1/std that lost its epsilon."""
    return grads_of(lambda a, w, b: _LayerNormRstdWithoutEps.apply(a, w, b, eps), (x, weight, bias), (dy,))


class _ErfGeluBackward(torch.autograd.Function):
    """Tanh-form forward, erf-form derivative in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(x2, bias)
        return _tk()._bias_gelu_forward(x2, bias, True).view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        x2, bias = ctx.saved_tensors
        dx, db = _tk()._bias_gelu_backward(x2, bias, dy.reshape(x2.shape), False)
        return dx.view(dy.shape), db


def triton_bias_gelu_grads_erf(x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """bias + GELU gradients with the erf form's derivative."""
    return grads_of(_ErfGeluBackward.apply, (x, bias), (dy,))


class _AddLayerNormWithoutDs(torch.autograd.Function):
    """Residual add + LayerNorm whose backward forgets the gradient arriving on the sum itself."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        C = x.shape[-1]
        y, s, mean, rstd = _tk()._layer_norm_forward(x.reshape(-1, C).contiguous(),
                                                     residual.reshape(-1, C).contiguous(), weight, bias, eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, ds: torch.Tensor, dy: torch.Tensor) -> tuple:
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _tk()._layer_norm_backward(s, weight, mean, rstd, dy.reshape(s.shape), None)
        dx = dx.view(dy.shape)
        return dx, dx, dw, db, None


def triton_add_layer_norm_grads_without_ds(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                           bias: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor,
                                           eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """Residual add + LayerNorm gradients without the residual stream's own gradient."""
    return grads_of(lambda a, r, w, b: _AddLayerNormWithoutDs.apply(a, r, w, b, eps), (x, residual, weight, bias),
                    (ds, dy))


class _SoftmaxBackwardUnscaled(torch.autograd.Function):
    """Right forward; the backward forgets the chain rule's factor ``scale``."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
        T, S = scores.shape[-2:]
        y = _tk()._softmax_forward(scores.reshape(-1, S).contiguous(), T, S - T, scale, causal)
        ctx.save_for_backward(y)
        return y.view(scores.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        (y,) = ctx.saved_tensors
        return _tk()._softmax_backward(y, dy.reshape(y.shape), 1.0).view(dy.shape), None, None


def triton_softmax_grads_unscaled(scores: torch.Tensor, scale: float, causal: bool,
                                  dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Softmax gradients missing the factor ``scale``."""
    return grads_of(lambda z: _SoftmaxBackwardUnscaled.apply(z, scale, causal), (scores,), (dy,))


# ------------------------------------------------------------------ C++


def cpp_erf_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The C++ loop in GELU's erf form where the tanh form is meant."""
    return _cpp().bias_gelu(x, bias, approximate="none")


def cpp_layer_norm_without_eps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               eps: float = 1e-5) -> torch.Tensor:
    """The C++ LayerNorm with eps = 0."""
    return _cpp().layer_norm(x, weight, bias, 0.0)


def cpp_residual_after_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm(x) + residual where LayerNorm(x + residual) is meant (C++)."""
    return x + residual, _cpp().layer_norm(x, weight, bias, eps) + residual


# ------------------------------------------------------------------ the fused GPT


def _residual_after_norm_ops(backend: str) -> fusion_model.FusedOps:
    ops = fusion_model.ops_for(backend)

    def add_then_wrong_norm(x, residual, weight, bias, eps=1e-5):  # noqa: ANN001, ANN202
        return x + residual, ops.layer_norm(x, weight, bias, eps) + residual

    return fusion_model.FusedOps(ops.bias_gelu, ops.layer_norm, add_then_wrong_norm, ops.attention)


def cpp_model_residual_after_norm(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The C++-fused GPT whose blocks add the attention output after ln_2 instead of before."""
    with torch.no_grad():
        return fusion_model.fused_copy(model, ops=_residual_after_norm_ops("cpp"))(idx)


def cpp_model_erf_gelu(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The C++-fused GPT with GELU's erf form in its MLPs."""
    ops = fusion_model.ops_for("cpp")
    erf_ops = fusion_model.FusedOps(cpp_erf_gelu, ops.layer_norm, ops.add_layer_norm)
    with torch.no_grad():
        return fusion_model.fused_copy(model, ops=erf_ops)(idx)


def triton_model_residual_after_norm(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The Triton-fused GPT whose blocks add the attention output after ln_2 instead of before."""
    with torch.no_grad():
        return fusion_model.fused_copy(model, ops=_residual_after_norm_ops("triton_softmax"))(idx)


def traced_with_stale_weights(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """A trace (frozen: weights become constants) taken before the model's weights were loaded."""
    fresh = GPT(model.config).eval()
    return fusion_model.traced(fresh, idx)(idx)
