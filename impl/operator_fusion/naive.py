"""The unfused compositions: what eager PyTorch runs for each op this GPT uses, one kernel per step.

Every function is written out in plain torch ops, the way a textbook states it, so each step
reads (and writes) the whole tensor once more: that memory traffic is what fusion removes.

- ``bias_gelu``: ``Linear`` output plus its bias, then GELU (tanh form, GPT-2's "gelu_new"):
  ``gelu(u) = 0.5 u (1 + tanh(sqrt(2 / pi) (u + 0.044715 u^3)))``; the exact (erf) form is
  ``0.5 u (1 + erf(u / sqrt(2)))``.
- ``layer_norm``: ``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim, with the
  biased variance (divided by C, as ``nn.LayerNorm``).
- ``add_layer_norm``: the pre-norm block's ``s = x + residual; y = layer_norm(s)``; both are
  returned, because the residual stream goes on with ``s``.
- ``scaled_masked_softmax``: attention's softmax: scores times ``scale``, keys after the query
  masked (causal, aligned bottom-right as in ``impl/gpt/attention.py``), softmax over keys.

The ``*_grads`` functions are autograd through these compositions: the gradients a fused
backward must reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_COEFF = 0.044715


def gelu(u: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU of ``u`` elementwise: the tanh approximation or, with ``approximate="none"``, the erf form."""
    if approximate == "tanh":
        return 0.5 * u * (1.0 + torch.tanh(SQRT_2_OVER_PI * (u + GELU_COEFF * u * u * u)))
    if approximate == "none":
        return 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
    raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(x + bias)``: x (..., C), bias (C,) -> (..., C)."""
    return gelu(x + bias, approximate)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., C) over its last dim with weight, bias (C,) -> (..., C)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)  # biased, as nn.LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s)) with ``s = x + residual``; x, residual (..., C)."""
    s = x + residual
    return s, layer_norm(s, weight, bias, eps)


def scaled_masked_softmax(scores: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(scale * scores) over the last dim of scores (..., T, S); with ``causal``, query i sees
    keys 0 .. S - T + i only (bottom-right aligned: the T queries are the last T of S positions)."""
    T, S = scores.shape[-2:]
    z = scores * scale
    if causal:
        keys, queries = torch.arange(S, device=scores.device), torch.arange(T, device=scores.device)
        visible = keys[None, :] <= queries[:, None] + S - T  # (T, S)
        z = z.masked_fill(~visible, float("-inf"))
    z = z - z.amax(dim=-1, keepdim=True)  # exp of at most 0: no overflow
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)


def grads_of(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor],
             grad_outputs: Sequence[torch.Tensor], **kwargs: object) -> tuple[torch.Tensor, ...]:
    """Gradients of ``fn(*inputs, **kwargs)`` with respect to every tensor of ``inputs``, for the
    upstream gradients ``grad_outputs`` (one per output of ``fn``)."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        out = fn(*inputs, **kwargs)
        outputs = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(outputs, inputs, list(grad_outputs))


def gradient_fns(bias_gelu_fn: Callable[..., torch.Tensor], layer_norm_fn: Callable[..., torch.Tensor],
                 add_layer_norm_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                 softmax_fn: Callable[..., torch.Tensor]) -> tuple[Callable[..., tuple[torch.Tensor, ...]], ...]:
    """The four ops' gradient functions for one implementation of the ops (what the spec's gradient
    checks compare, naive against Triton): ``bias_gelu_grads(x, bias, dy) -> (dx, dbias)``,
    ``layer_norm_grads(x, weight, bias, dy, eps) -> (dx, dweight, dbias)``,
    ``add_layer_norm_grads(x, residual, weight, bias, ds, dy, eps) -> (dx, dresidual, dweight, dbias)`` for
    upstream gradients ds (of the sum, the residual stream) and dy (of the normed output), and
    ``softmax_grads(scores, scale, causal, dy) -> (dscores,)``."""

    def bias_gelu_grads(x: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grads_of(bias_gelu_fn, (x, bias), (dy,))

    def layer_norm_grads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor,
                         eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
        return grads_of(layer_norm_fn, (x, weight, bias), (dy,), eps=eps)

    def add_layer_norm_grads(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             ds: torch.Tensor, dy: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
        return grads_of(add_layer_norm_fn, (x, residual, weight, bias), (ds, dy), eps=eps)

    def softmax_grads(scores: torch.Tensor, scale: float, causal: bool, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grads_of(softmax_fn, (scores,), (dy,), scale=scale, causal=causal)

    return bias_gelu_grads, layer_norm_grads, add_layer_norm_grads, softmax_grads


# autograd through the compositions above
bias_gelu_grads, layer_norm_grads, add_layer_norm_grads, softmax_grads = gradient_fns(
    bias_gelu, layer_norm, add_layer_norm, scaled_masked_softmax)
