"""Quantization-aware training of the shared GPT: fake-quantized linears, fine-tuning, export.

1. ``prepare_qat`` replaces every target ``nn.Linear`` (by name, as LoRA and the PTQ modules do) by a
   ``FakeQuantLinear`` that holds the same weight and bias parameters and multiplies by the weight's
   fake-quantized copy (``impl.qat.fast``: the weight the integer model will hold, STE gradient);
2. ``qat_finetune`` trains that model with the shared loop (``impl.train.loop.train``): every
   parameter trains, the latent fp32 weights move, the forward always sees their grid values;
3. ``convert`` exports the trained weights' integer codes (``impl.ptq.quant``: the same ranges the
   fake quantizer used) into the project-14 ``QuantLinear`` modules (``impl.ptq.modules.quantize_model``).

Activations stay in floating point: this is weight-only QAT, matching the weight-only PTQ it is
compared with. The tied embedding / LM head is not quantized (it is one matrix read by the lookup and
the head; fake-quantizing only the head would train a model the export could not reproduce).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.gpt.model import GPT
from impl.ptq.modules import TARGETS, linear_names, quantize_model, replace_module
from impl.ptq.quant import Scheme, qparams, quantize
from impl.qat import fast, naive
from impl.train.loop import TrainConfig, TrainResult, train

FAKE_QUANTIZERS = {"naive": naive.fake_quantize, "fast": fast.fake_quantize}


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward uses its weight fake-quantized to ``scheme`` (bias in fp)."""

    def __init__(self, linear: nn.Linear, scheme: Scheme, impl: str = "fast"):
        super().__init__()
        self.weight = linear.weight  # the same Parameter: an optimizer built before or after sees it
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        self.impl = impl
        self.fake_quantize = FAKE_QUANTIZERS[impl]

    def quantized_weight(self) -> torch.Tensor:
        """The (out, in) weight the forward multiplies by: its grid values, differentiable by the STE."""
        return self.fake_quantize(self.weight, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (out, in) integer codes, scale, zero (out, n_groups) fp32) of the current weight."""
        scale, zero = qparams(self.weight, self.scheme)
        return quantize(self.weight, scale, zero, self.scheme), scale, zero

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the latent (not rounded) weight and the bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme.label()}, {self.impl}"


def prepare_qat(model: nn.Module, scheme: Scheme, targets: tuple[str, ...] = TARGETS, impl: str = "fast") -> list[str]:
    """Replace each target linear of ``model`` in place by a ``FakeQuantLinear`` (``impl``: ``"naive"``
    or ``"fast"`` STE). Returns the names replaced."""
    names = linear_names(model, targets)
    for name in names:
        replace_module(model, name, FakeQuantLinear(model.get_submodule(name), scheme, impl))
    return names


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every ``FakeQuantLinear`` of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def export_codes(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module name: (q, scale, zero)} of every fake-quantized layer: the integers the QAT model's
    forward stands for, in ``impl.ptq.modules.quantize_model``'s ``weights=`` format."""
    return {name: m.codes() for name, m in fake_quant_modules(model).items()}


def convert(model: nn.Module, targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Turn a QAT model into a real integer one in place: export the codes, put plain linears back,
    then ``quantize_model`` builds ``QuantLinear`` modules from exactly those codes. Returns the names."""
    fakes = fake_quant_modules(model)
    if not fakes:
        raise ValueError("convert: the model has no FakeQuantLinear layers (call prepare_qat first)")
    schemes = {m.scheme for m in fakes.values()}
    if len(schemes) != 1:
        raise ValueError(f"convert: layers use different schemes {sorted(s.label() for s in schemes)}")
    codes = export_codes(model)
    for name, m in fakes.items():
        replace_module(model, name, m.to_linear())
    return quantize_model(model, schemes.pop(), targets=targets, weights=codes)


def qat_finetune(model: nn.Module, train_ids: np.ndarray, val_ids: np.ndarray, scheme: Scheme, cfg: TrainConfig,
                 targets: tuple[str, ...] = TARGETS, impl: str = "fast", progress: bool = False) -> TrainResult:
    """Fake-quantize ``model``'s target linears (``prepare_qat``) and fine-tune every parameter with the
    shared loop for ``cfg.max_iters`` steps of ``cfg.batch_size`` x ``cfg.block_size`` train tokens.
    The model is left fake-quantized (call ``convert`` for the integer model)."""
    prepare_qat(model, scheme, targets, impl)
    return train(model, train_ids, val_ids, cfg, progress=progress)


# The check adapters the spec calls: a GPT (config, state), fake-quantized or exported, on tokens idx.

def _qat_model(config: dict[str, Any], state: dict[str, torch.Tensor], bits: int, group_size: int | None,
               symmetric: bool) -> GPT:
    model = GPT.from_state(config, state).float()
    prepare_qat(model, Scheme(bits, group_size, symmetric))
    return model


def fake_quant_logits(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor, bits: int,
                      group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT with fake-quantized target linears (fp32)."""
    with torch.no_grad():
        return _qat_model(config, state, bits, group_size, symmetric)(idx)


def exported_logits(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor, bits: int,
                    group_size: int | None, symmetric: bool) -> torch.Tensor:
    """Logits of the same GPT after ``convert``: integer ``QuantLinear`` layers holding the exported codes."""
    model = _qat_model(config, state, bits, group_size, symmetric)
    convert(model)
    with torch.no_grad():
        return model(idx)
