"""LLM.int8() (Dettmers et al., 2022): int8 matrix multiplication with mixed-precision decomposition.

A linear layer's weight is stored as int8 with one absmax scale per output channel. On every call:

- outlier columns: the input feature dimensions in which any activation reaches ``threshold`` (6.0, the
  paper's) in magnitude. They are few (the paper's "emergent features") and are multiplied in full
  precision (fp32 here; the paper's fp16) against the weight's columns;
- every other column: activations quantized to int8 with one absmax scale per row (token), multiplied
  int8 x int8 with int32 accumulation (``torch._int_mm``), rescaled by row scale x channel scale.

The outlier columns meet the DEQUANTIZED int8 weight, as bitsandbytes' ``Linear8bitLt`` does when it holds
only int8 weights: the layer keeps no full-precision copy of the weight, so it stores 1 byte per weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from impl.ptq.quant import Scheme, qparams, quantize

THRESHOLD = 6.0  # the paper's outlier magnitude
INT8 = Scheme(8, None, True)  # per output channel (weights) / per row (activations), symmetric


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (n, k), scale fp32 (n, 1)): absmax-quantized rows of ``x`` (n, k)."""
    scale, zero = qparams(x, INT8)
    return quantize(x, scale, zero, INT8), scale


class Int8OutlierLinear(nn.Module):
    """A frozen linear layer computed the LLM.int8() way (see the module docstring)."""

    def __init__(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 threshold: float = THRESHOLD):
        super().__init__()
        self.register_buffer("weight_codes", weight_codes)  # (out, in) int8
        self.register_buffer("weight_scale", weight_scale)  # (out, 1) fp32
        self.register_buffer("bias", bias)
        self.threshold = threshold
        self.out_features, self.in_features = weight_codes.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = THRESHOLD) -> Int8OutlierLinear:
        """The layer holding ``linear``'s weight as int8 per-output-channel codes (and its bias in fp32)."""
        w = linear.weight.detach().float()
        codes, scale = int8_rows(w)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        return cls(codes, scale, bias, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        outlier = (x2.abs() >= self.threshold).any(dim=0)  # (in,) the outlier feature dimensions
        regular = x2.masked_fill(outlier, 0.0)
        xq, x_scale = int8_rows(regular)
        y = torch._int_mm(xq, self.weight_codes.t()).float() * x_scale * self.weight_scale[:, 0]  # (N, out)
        if outlier.any():
            w_out = self.weight_codes[:, outlier].float() * self.weight_scale  # (out, n_outliers)
            y = y + x2[:, outlier] @ w_out.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        """Bytes stored: int8 codes, fp32 channel scales and bias."""
        return sum(t.numel() * t.element_size() for t in self.buffers())


def llm_int8_model(model: nn.Module, threshold: float = THRESHOLD,
                   targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")) -> list[str]:
    """Replace every block linear named by ``targets`` of ``model`` by an ``Int8OutlierLinear``, in place;
    returns the names replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, Int8OutlierLinear.from_linear(model.get_submodule(name), threshold))
    return names


def llm_int8_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                    threshold: float = THRESHOLD) -> torch.Tensor:
    """``Int8OutlierLinear`` holding ``weight`` (out, in) / ``bias`` applied to ``x`` (..., in): the spec's
    entry point."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    with torch.no_grad():
        return Int8OutlierLinear.from_linear(linear, threshold)(x)


def w8a8_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                threshold: float = 0.0) -> torch.Tensor:
    """``impl.ptq.modules.QuantLinear`` (int8 per-channel symmetric) holding ``weight`` / ``bias``, running
    W8A8 (``torch._int_mm``) on ``x`` (..., in): plain int8 matmul, no outlier columns (``threshold`` must be
    0, bitsandbytes' setting for the same thing)."""
    from impl.ptq.modules import QuantLinear

    if threshold != 0:
        raise ValueError(f"W8A8 has no outlier decomposition: threshold must be 0, got {threshold}")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        layer = QuantLinear.from_linear(linear, INT8)
        layer.use_int8_matmul(True)
        return layer(x)
