"""Mutants of project 16: fake quantizers with the wrong rounding, zero point, grouping or STE, and an
export that drops the quantization."""

from __future__ import annotations

import torch

from impl.ptq.modules import replace_module
from impl.ptq.quant import Scheme, qparams
from impl.qat import fast, train
from impl.qat.naive import quant_ranges


def _fake(x, bits, group_size, symmetric, scale=None, zero=None, *, rounding=torch.round, dequant=None,
          scheme_for_ranges=None, upper_inclusive=True, straight_through_everywhere=False):
    """A fake quantizer built like fast.py's, with one piece swapped (keyword-only knobs)."""
    scheme = Scheme(bits, group_size, symmetric)
    if scale is None and scheme_for_ranges is not None:
        scale, zero = qparams(x, scheme_for_ranges)
        scale = scale.repeat_interleave(scheme.groups(x.shape[-1]) // scale.shape[-1], dim=-1)
        zero = zero.repeat_interleave(scheme.groups(x.shape[-1]) // zero.shape[-1], dim=-1)
    scale, zero = quant_ranges(x, scheme, scale, zero)
    g = x.reshape(*x.shape[:-1], scheme.groups(x.shape[-1]), -1)
    s, z = scale[..., None], zero[..., None]
    code = rounding(g.detach().float() / s) + z
    keep = (code >= scheme.qmin) & ((code <= scheme.qmax) if upper_inclusive else (code < scheme.qmax))
    clamped = code.clamp(scheme.qmin, scheme.qmax)
    value = dequant(clamped, s, z) if dequant is not None else (clamped - z) * s
    value = value.reshape(x.shape).to(x.dtype)
    if straight_through_everywhere:
        return x + (value - x).detach()
    mask = keep.reshape(x.shape).to(x.dtype)
    return value + (x - x.detach()) * mask  # value forward, mask * upstream backward


def rounds_half_away_from_zero(x, bits, group_size, symmetric, scale=None, zero=None):
    """Rounds ties away from zero (C's round) instead of to even (torch.round, the integer model's rule)."""
    return _fake(x, bits, group_size, symmetric, scale, zero,
                 rounding=lambda t: torch.sign(t) * torch.floor(t.abs() + 0.5))


def zero_point_not_removed(x, bits, group_size, symmetric, scale=None, zero=None):
    """Dequantizes as q * scale - zero: the zero point subtracted after scaling instead of before."""
    return _fake(x, bits, group_size, symmetric, scale, zero, dequant=lambda q, s, z: q * s - z)


def one_range_per_row(x, bits, group_size, symmetric, scale=None, zero=None):
    """Takes each row's range for every group of the row (per-channel ranges under a per-group scheme)."""
    return _fake(x, bits, group_size, symmetric, scale, zero, scheme_for_ranges=Scheme(bits, None, symmetric))


def gradient_through_clamped(x, bits, group_size, symmetric, scale=None, zero=None):
    """The ``x + (fake(x) - x).detach()`` trick: identity gradient everywhere, clamped values included."""
    return _fake(x, bits, group_size, symmetric, scale, zero, straight_through_everywhere=True)


def mask_excludes_qmax(x, bits, group_size, symmetric, scale=None, zero=None):
    """Treats a code equal to qmax as clamped (``code < qmax``): the top grid level gets no gradient."""
    return _fake(x, bits, group_size, symmetric, scale, zero, upper_inclusive=False)


def scale_from_qmax(x, bits, group_size, symmetric, scale=None, zero=None):
    """Symmetric scale absmax / qmax (the grid's positive half) instead of absmax / ((qmax - qmin) / 2)."""
    scheme = Scheme(bits, group_size, symmetric)
    own, z = qparams(x, scheme)
    return fast.fake_quantize(x, scheme, own * ((scheme.qmax - scheme.qmin) / 2) / scheme.qmax, z)


def export_keeps_float_weights(config, state, idx, bits, group_size, symmetric):
    """"Exports" the latent fp32 weights: the fake quantizers are removed, nothing is quantized."""
    model = train._qat_model(config, state, bits, group_size, symmetric)
    for name, m in train.fake_quant_modules(model).items():
        replace_module(model, name, m.to_linear())
    with torch.no_grad():
        return model(idx)


def export_floors_codes(config, state, idx, bits, group_size, symmetric):
    """Exports codes rounded down instead of to nearest."""
    original = train.FakeQuantLinear.codes

    def codes(self):
        scale, zero = qparams(self.weight, self.scheme)
        g = self.weight.detach().reshape(self.weight.shape[0], scale.shape[-1], -1)
        q = (torch.floor(g / scale[..., None]) + zero[..., None]).clamp(self.scheme.qmin, self.scheme.qmax)
        return q.reshape(self.weight.shape).to(self.scheme.storage), scale, zero

    train.FakeQuantLinear.codes = codes
    try:
        return train.exported_logits(config, state, idx, bits, group_size, symmetric)
    finally:
        train.FakeQuantLinear.codes = original
