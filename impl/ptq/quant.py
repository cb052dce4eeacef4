"""Uniform integer quantization: the one place scales, zero points, rounding and 4-bit packing live.

Every quantizer of projects 14-16 (round-to-nearest, GPTQ, LLM.int8(), the KV cache's, QAT's fake
quantization) maps a float tensor to integers the same way:

- a ``Scheme`` says how many bits, how values are grouped and whether the grid is symmetric;
- groups run along the LAST dimension: ``group_size=None`` is one group per row (per-channel for a
  weight (out, in): one scale per output channel), ``group_size=g`` cuts each row into runs of ``g``;
- symmetric: integers ``-2^(b-1) .. 2^(b-1)-1``, zero point 0, ``scale = absmax / ((qmax - qmin) / 2)``;
  asymmetric: integers ``0 .. 2^b - 1``, ``scale = (max - min) / (qmax - qmin)`` with the range widened
  to hold 0, ``zero = qmin - round(min / scale)``. These are torchao's conventions (so project 16 can
  compare fake quantizers on equal terms);
- ``q = clamp(round(x / scale) + zero, qmin, qmax)``, ``x ~= (q - zero) * scale`` (round half to even).

Scales are kept in fp32 whatever the input dtype; a group of zeros gets the smallest scale
(``finfo(float32).eps``) rather than a division by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = torch.finfo(torch.float32).eps  # the smallest scale a group gets (an all-zero group)


@dataclass(frozen=True)
class Scheme:
    """How a tensor is quantized: ``bits`` (2..8), ``group_size`` (None: one group per row) and
    ``symmetric`` (zero point 0) or not."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"Scheme: bits must be 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"Scheme: group_size must be positive or None, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage(self) -> torch.dtype:
        """The integer dtype that holds one code unpacked (int8 symmetric, uint8 asymmetric)."""
        return torch.int8 if self.symmetric else torch.uint8

    def groups(self, n: int) -> int:
        """Groups in a row of ``n`` values (a row not divisible by the group size is an error)."""
        g = self.group_size or n
        if n % g:
            raise ValueError(f"a row of {n} values does not split into groups of {g}")
        return n // g

    def label(self) -> str:
        """Short name: ``int4 g128 sym``, ``int8 per-channel asym``."""
        grouping = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {grouping} {'sym' if self.symmetric else 'asym'}"


def _grouped(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``x`` (..., n) viewed as (..., n_groups, group)."""
    n = x.shape[-1]
    return x.reshape(*x.shape[:-1], scheme.groups(n), -1)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) fp32 for groups whose values lie in [lo, hi] (any matching shapes): the rule in the
    module docstring. GPTQ calls it with ranges it found itself; ``qparams`` with each group's min/max."""
    lo, hi = lo.float(), hi.float()
    if scheme.symmetric:
        scale = torch.maximum(-lo, hi) / ((scheme.qmax - scheme.qmin) / 2)
        scale = scale.clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the grid always holds 0 exactly
    scale = ((hi - lo) / (scheme.qmax - scheme.qmin)).clamp(min=EPS)
    zero = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def qparams(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (..., n_groups) fp32, from the range of every group of ``x`` (..., n)."""
    g = _grouped(x.detach().float(), scheme)
    return params_from_range(g.amin(dim=-1), g.amax(dim=-1), scheme)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Integer codes of ``x`` (..., n) in ``scheme.storage``, with per-group ``scale``/``zero`` (..., n_groups)."""
    g = _grouped(x.float(), scheme)
    q = torch.round(g / scale[..., None]) + zero[..., None]
    return q.clamp(scheme.qmin, scheme.qmax).reshape(x.shape).to(scheme.storage)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values codes ``q`` (..., n) stand for: ``(q - zero) * scale`` per group, as ``dtype``."""
    g = _grouped(q.float(), scheme)
    return ((g - zero[..., None]) * scale[..., None]).reshape(q.shape).to(dtype)


def quantize_dequantize(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``x`` rounded to its grid (same shape and dtype): quantize with its own ranges, then dequantize.
    The plain round-to-nearest (RTN) weight and the value a fake quantizer outputs."""
    scale, zero = qparams(x, scheme)
    return dequantize(quantize(x, scale, zero, scheme), scale, zero, scheme, x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim (the first in the high nibble; an odd row is padded
    with a 0 code): (..., n) int8 in -8..7 or uint8 in 0..15 -> (..., ceil(n/2)) uint8."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    nibbles = F.pad(nibbles, (0, q.shape[-1] % 2))
    return (nibbles[..., 0::2] << 4) | nibbles[..., 1::2]


def unpack_int4(packed: torch.Tensor, n: int, signed: bool) -> torch.Tensor:
    """The first ``n`` codes of each row of ``packed`` (..., m) uint8: int8 in -8..7 when ``signed``
    (two's complement nibbles), else uint8 in 0..15. Inverse of ``pack_int4``."""
    both = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    if not signed:
        return both
    return (both.to(torch.int16) - ((both >= 8).to(torch.int16) << 4)).to(torch.int8)
