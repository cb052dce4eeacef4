"""Fake quantization with a straight-through estimator, written the textbook way.

Forward: the weight is rounded to its integer grid and mapped back to floats, exactly
``dequantize(quantize(x))`` of ``impl.ptq.quant`` (the same scales, rounding and clamping as the
real integer model, so training sees the weights the exported model will hold).

Backward: rounding has zero gradient almost everywhere, so QAT pretends it is the identity (the
straight-through estimator, Bengio et al. 2013; Jacob et al. 2018). Clamping is not pretended away:
a value whose code ``round(x / scale) + zero`` falls outside ``[qmin, qmax]`` was clamped and gets
gradient 0 (PyTorch's and torchao's rule):

    d out / d x = 1  if qmin <= round(x / scale) + zero <= qmax  else 0

Scales and zero points come from the current weight at each call (``qparams``: each group's own
min/max) and carry no gradient. With ranges from the group itself almost nothing is clamped: only a
value on the top edge of its range, whose code rounds half a step past ``qmax`` (a symmetric grid
spans ``absmax / scale = (qmax - qmin) / 2``, e.g. 7.5 at 4 bits, which rounds to 8 and is clamped to
7; an asymmetric grid can put ``max`` at ``qmax + 0.5`` after the zero point is rounded). Ranges
given from outside (``scale=``, ``zero=``: a clipped range, a frozen calibration) clamp more.

This file is the plain version: one ``autograd.Function`` that calls the shared primitives, then
computes the clamp mask in a second pass. ``fast.py`` computes both in one pass.
"""

from __future__ import annotations

import torch

from impl.ptq.quant import Scheme, dequantize, qparams, quantize


def quant_ranges(x: torch.Tensor, scheme: Scheme, scale: torch.Tensor | None,
            zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The given (scale, zero), or the ones of ``x``'s own groups; never part of the graph."""
    if (scale is None) != (zero is None):
        raise ValueError("fake_quantize: pass both scale and zero, or neither (then x's own ranges are used)")
    if scale is None:
        return qparams(x, scheme)
    return scale.detach().float(), zero.detach().float()


def in_range_mask(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Bool (same shape as ``x`` (..., n)): True where ``round(x / scale) + zero`` lies in
    ``[qmin, qmax]`` (the value was not clamped), per group of the scheme."""
    g = x.float().reshape(*x.shape[:-1], scheme.groups(x.shape[-1]), -1)  # (..., n_groups, group)
    code = torch.round(g / scale[..., None]) + zero[..., None]
    return ((code >= scheme.qmin) & (code <= scheme.qmax)).reshape(x.shape)


class FakeQuantizeSTE(torch.autograd.Function):
    """out = dequantize(quantize(x)); grad_x = grad_out where the code was not clamped, else 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        q = quantize(x, scale, zero, scheme)  # clamped integer codes
        ctx.save_for_backward(in_range_mask(x, scale, zero, scheme))  # second pass over x for the mask
        return dequantize(q, scale, zero, scheme, x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None  # no gradient for the scales: they follow the weight


def fake_quantize(x: torch.Tensor, scheme: Scheme, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., n) fake-quantized to ``scheme`` (same shape and dtype), differentiable by the STE
    above; ranges from ``x``'s own groups unless ``scale``/``zero`` (..., n_groups) are given."""
    scale, zero = quant_ranges(x, scheme, scale, zero)
    return FakeQuantizeSTE.apply(x, scale, zero, scheme)


# The check adapters the spec calls: the scheme spelled out as (bits, group_size, symmetric).

def fake_quant(x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quantize`` with ``Scheme(bits, group_size, symmetric)`` (differentiable)."""
    return fake_quantize(x, Scheme(bits, group_size, symmetric), scale, zero)


def quantize_then_dequantize(x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                             scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle of the forward check: ``impl.ptq.quant``'s integer codes mapped back, no autograd."""
    scheme = Scheme(bits, group_size, symmetric)
    scale, zero = quant_ranges(x, scheme, scale, zero)
    return dequantize(quantize(x.detach(), scale, zero, scheme), scale, zero, scheme, x.dtype)
