"""NF4: the 4-bit NormalFloat data type of QLoRA (Dettmers et al., 2023), from scratch.

Algorithm (the paper's names):
- code values: 16 levels at quantiles of N(0, 1), so each level is equally likely for normally
  distributed weights; 8 from the upper half, 7 from the lower half and an exact 0, scaled to [-1, 1];
- block-wise absmax: the flat weight is cut into blocks of 64; each block is divided by its
  largest magnitude (the block's absmax, its scale) and every value becomes the index of the
  nearest code value, two 4-bit indices per byte (the first in the high nibble);
- double quantization: the fp32 absmax scales (one per 64 weights: 0.5 bit per weight) are
  themselves quantized: their mean is subtracted and the rest stored as int8 with one fp32
  scale per block of 256 (0.127 bit per weight).

Our second-level quantization is symmetric linear int8; bitsandbytes stores the scales with its
8-bit dynamic data type instead. The 4-bit codes are computed from the exact absmax in both, so they
agree; the dequantized weights differ by each side's scale error (the spec's check says by how much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.ptq.quant import pack_int4, unpack_int4

BLOCK = 64  # weights per absmax scale (QLoRA)
SCALE_BLOCK = 256  # absmax scales per second-level scale (QLoRA's double quantization)
# QLoRA's outermost quantile: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), so the extreme code is
# not infinite and both halves reach the same magnitude
_OUTER_QUANTILE = 0.9677083


def nf4_code_values() -> torch.Tensor:
    """The 16 NF4 levels (float32, ascending, -1 .. 1, code 7 is exactly 0), derived from normal quantiles."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    upper = normal.icdf(torch.linspace(_OUTER_QUANTILE, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive levels
    lower = -normal.icdf(torch.linspace(_OUTER_QUANTILE, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative levels
    levels = torch.cat([lower, torch.zeros(1, dtype=torch.float64), upper]).sort().values
    return (levels / levels.max()).float()


CODE = nf4_code_values()
_MIDPOINTS = (CODE[1:] + CODE[:-1]) / 2  # value v gets code i when midpoint[i-1] < v <= midpoint[i]
# every byte's two code values: one gather per byte dequantizes two weights (no shifts, no masks)
_BYTE_TO_VALUES = torch.stack([CODE[torch.arange(256) >> 4], CODE[torch.arange(256) & 0xF]], dim=1)  # (256, 2)


@dataclass
class NF4Tensor:
    """A weight in NF4: ``packed`` (ceil(n/2),) uint8 codes, and its block scales, either plain
    (``absmax`` (n_blocks,) fp32) or double-quantized (``scale_codes`` int8 (n_blocks,),
    ``scale_scales`` fp32 (ceil(n_blocks/256),), ``scale_offset`` fp32 scalar)."""

    packed: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    absmax: torch.Tensor | None = None
    scale_codes: torch.Tensor | None = None
    scale_scales: torch.Tensor | None = None
    scale_offset: torch.Tensor | None = None

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every 64-block (dequantized from int8 when double-quantized)."""
        if self.absmax is not None:
            return self.absmax
        n = self.scale_codes.numel()
        q = F.pad(self.scale_codes.float(), (0, -n % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
        return (q * self.scale_scales[:, None]).reshape(-1)[:n] + self.scale_offset

    def nbytes(self) -> int:
        """Bytes this weight occupies: packed codes plus its scales."""
        parts = (self.packed, self.absmax, self.scale_codes, self.scale_scales, self.scale_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes, per-256 fp32 scales and the mean: absmax ~= codes * scale + mean."""
    offset = absmax.mean()
    centered = absmax - offset  # positive scales share a large common part: store only the rest
    n = centered.numel()
    blocks = F.pad(centered, (0, -n % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
    step = (blocks.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(blocks / step[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:n], step, offset


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> NF4Tensor:
    """Quantize ``weight`` (any shape, any float dtype) to NF4 with block 64 (and double-quantized scales)."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)  # zero padding changes no block's absmax
    absmax = blocks.abs().amax(dim=1)
    normalized = (blocks / absmax.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    # nearest level = the number of midpoints below the value (a binary search, not a 16-way argmin)
    codes = torch.bucketize(normalized, _MIDPOINTS, out_int32=True).to(torch.uint8)
    out = NF4Tensor(packed=pack_int4(codes), shape=weight.shape, dtype=weight.dtype)  # first code: high nibble
    if double_quant:
        out.scale_codes, out.scale_scales, out.scale_offset = _double_quantize(absmax)
    else:
        out.absmax = absmax
    return out


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit code indices (int64) stored in ``packed`` (uint8, high nibble first)."""
    return unpack_int4(packed, n, signed=False).long()


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight ``q`` stands for, in its original shape, as ``dtype`` (default: its original dtype)."""
    n = q.shape.numel()
    values = _BYTE_TO_VALUES.to(q.packed.device)[q.packed.long()].reshape(-1)[:n]  # (n,) fp32 code values
    blocks = F.pad(values, (0, -n % BLOCK)).view(-1, BLOCK) * q.scales()[:, None]
    return blocks.reshape(-1)[:n].view(q.shape).to(dtype or q.dtype)


def quantize_dequantize(weight: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    """The packed codes ((ceil(n/2),) uint8), the block scales as stored (dequantized, (n/64,) fp32) and
    the dequantized weight (fp32, ``weight``'s shape): what the spec compares with bitsandbytes."""
    q = quantize_nf4(weight, double_quant)
    return {"codes": q.packed, "scales": q.scales(), "weight": dequantize_nf4(q, torch.float32)}


class _LinearOverNF4(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward: the full-precision weight
    is never kept alive between the two (saving it would hold a bf16 copy of every layer)."""

    @staticmethod
    def forward(ctx, x, layer, bias):  # noqa: ANN001 (autograd signature)
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        grad_x = grad_out @ ctx.layer.dequantized(grad_out.dtype)  # (..., out) @ (out, in)
        return grad_x, None, None  # the 4-bit weight is frozen: no gradient for it (nor its bias)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (buffers, so ``.to`` and state_dict carry
    it); forward dequantizes to the input's dtype (bf16 or fp32 compute)."""

    def __init__(self, q: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight_dtype = q.dtype
        self.double_quant = q.absmax is None
        for name in ("packed", "absmax", "scale_codes", "scale_scales", "scale_offset"):
            self.register_buffer(name, getattr(q, name))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True) -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight (its bias stays in full precision, frozen)."""
        return cls(quantize_nf4(linear.weight.detach(), double_quant), linear.bias)

    def nf4(self) -> NF4Tensor:
        """This layer's weight as an ``NF4Tensor`` (views of the buffers, no copy)."""
        return NF4Tensor(self.packed, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
                         self.absmax, self.scale_codes, self.scale_scales, self.scale_offset)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) in ``dtype``."""
        return dequantize_nf4(self.nf4(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if torch.is_grad_enabled() and x.requires_grad:
            return _LinearOverNF4.apply(x, self, bias)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
                f"double_quant={self.double_quant}")


def quantize_model(model: nn.Module, targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"),
                   double_quant: bool = True) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with one of ``targets`` by an ``NF4Linear``, one
    layer at a time (each full-precision weight is freed as soon as its 4-bit copy exists).
    Returns the names replaced; a pattern matching nothing is a ValueError."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"quantize_model: no nn.Linear named {list(targets)} in the model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, NF4Linear.from_linear(getattr(owner, child), double_quant))
    return names
