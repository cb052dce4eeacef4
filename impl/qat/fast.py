"""Fake quantization with the straight-through estimator in one pass (the same rule as ``naive.py``).

"Fused" here means one ``autograd.Function`` whose forward computes each code once and derives
both outputs from it, where ``naive.py`` calls the shared primitives and then recomputes the codes
for the clamp mask:

- the unclamped code ``round(x / scale) + zero`` is computed once, in place in one buffer;
- the mask is read off that buffer before clamping, and saved as bool (1 byte per weight);
- clamp, subtract the zero point and multiply by the scale continue in place in the same buffer,
  with no integer cast and back (the codes are already whole numbers in fp32).

The arithmetic is the shared primitives' operation for operation (divide, round half to even, add,
clamp, subtract, multiply, all fp32), so the output equals ``dequantize(quantize(x))`` bit for bit;
the spec's check holds it to that.

The ``x + (fake(x) - x).detach()`` trick would be shorter still, but it passes the gradient through
clamped values too: a different estimator, kept as a mutant (``tests/mutants/qat.py``).
"""

from __future__ import annotations

import torch

from impl.ptq.quant import Scheme
from impl.qat.naive import quant_ranges


class FusedFakeQuantize(torch.autograd.Function):
    """out = ((clamp(round(x / s) + z) - z) * s), grad_x = grad_out where not clamped, in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        g = x.reshape(*x.shape[:-1], scheme.groups(x.shape[-1]), -1)  # (..., n_groups, group)
        s, z = scale[..., None], zero[..., None]
        code = g.float() / s  # a new buffer: every op below is in place in it
        code.round_().add_(z)  # the unclamped code, computed once
        mask = (code >= scheme.qmin) & (code <= scheme.qmax)  # read before clamping
        ctx.save_for_backward(mask)
        out = code.clamp_(scheme.qmin, scheme.qmax).sub_(z).mul_(s)  # dequantized in place
        return out.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad = grad_out.reshape(mask.shape) * mask
        return grad.reshape(grad_out.shape), None, None, None


def fake_quantize(x: torch.Tensor, scheme: Scheme, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., n) fake-quantized to ``scheme`` (same shape and dtype) with the straight-through
    estimator; ranges from ``x``'s own groups unless ``scale``/``zero`` (..., n_groups) are given.
    Same contract and same numbers as ``impl.qat.naive.fake_quantize``."""
    scale, zero = quant_ranges(x, scheme, scale, zero)
    return FusedFakeQuantize.apply(x, scale, zero, scheme)


def fake_quant(x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """The spec's adapter: ``fake_quantize`` with ``Scheme(bits, group_size, symmetric)`` (differentiable)."""
    return fake_quantize(x, Scheme(bits, group_size, symmetric), scale, zero)
