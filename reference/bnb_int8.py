"""bitsandbytes' ``Linear8bitLt`` (LLM.int8(), int8 weights, optional outlier threshold) and ``Linear4bit``
(NF4 / FP4) built from the same ``nn.Linear``, on CPU: the peers of ``impl.ptq``. Shares no code with it.

In eval mode on CPU (bitsandbytes 0.50.2) ``Linear8bitLt`` casts activations to fp16, zeroes the outlier
entries (|x| >= threshold), quantizes each row to int8 by its absmax / 127, multiplies int8 x int8 with the
weight quantized per output row by absmax / 127 (of the fp16-cast weight) and adds the outlier columns
times the dequantized weight columns. In training mode it would dequantize instead (``MatMul8bitFp``), so
every layer here is put in eval mode."""

from __future__ import annotations

import torch
import torch.nn as nn


def linear8bit(linear: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """``bnb.nn.Linear8bitLt`` holding ``linear``'s weight as int8 (no fp16 copy) and its bias, eval mode."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold, device="cpu")
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().float().clone(), requires_grad=False,
                                     has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to("cpu").eval()  # .to quantizes the weight


def linear4bit(linear: nn.Linear, quant_type: str = "nf4") -> nn.Module:
    """``bnb.nn.Linear4bit`` (``quant_type`` nf4 or fp4, blocks of 64, fp32 compute) holding ``linear``'s
    weight; ``in_features`` must be a multiple of 64 on CPU (see reference/bnb_nf4.py)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type=quant_type, device="cpu")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().float().clone(), requires_grad=False,
                                     quant_type=quant_type, blocksize=64)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    return layer.to("cpu").eval()


def linear8bit_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                       threshold: float = 6.0) -> torch.Tensor:
    """``Linear8bitLt`` with ``threshold`` (0: plain W8A8, no outlier columns) holding ``weight`` (out, in)
    and ``bias``, applied to ``x`` (..., in); fp32 output."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear8bit(linear, threshold)(x.float()).float()


def quantize_model(model: nn.Module, kind: str = "int8", threshold: float = 6.0,
                   targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")) -> list[str]:
    """Replace every block linear of a GPT named by ``targets`` by bitsandbytes' layer, in place: ``kind``
    ``int8`` (``Linear8bitLt`` with ``threshold``), ``nf4`` or ``fp4`` (``Linear4bit``). Returns the names."""
    make = {"int8": lambda m: linear8bit(m, threshold), "nf4": lambda m: linear4bit(m, "nf4"),
            "fp4": lambda m: linear4bit(m, "fp4")}[kind]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, make(model.get_submodule(name)))
    return names


def layer_nbytes(layer: nn.Module) -> int:
    """Bytes a bitsandbytes layer stores: its weight codes, bias and quantization statistics (int8: the
    per-row absmax SCB; 4-bit: the quant state's absmax and its own statistics)."""
    total = sum(p.numel() * p.element_size() for p in layer.parameters())
    scb = getattr(layer.weight, "SCB", None)
    if scb is None and getattr(layer, "state", None) is not None:
        scb = getattr(layer.state, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    qs = getattr(layer.weight, "quant_state", None)
    if qs is not None:
        state2 = getattr(qs, "state2", None)  # only when the absmax are double-quantized
        total += sum(t.numel() * t.element_size() for t in (qs.absmax, getattr(state2, "absmax", None),
                                                             getattr(state2, "code", None)) if t is not None)
    return total
