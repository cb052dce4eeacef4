"""Mutants of project 5: LoRA, its merge, its count, its adapter loading, and NF4."""

from __future__ import annotations

import torch

from impl.gpt.model import GPT, GPTConfig
from impl.lora import fast, nf4


def merge_without_scale(config, state, adapter, idx, rank, alpha, targets):
    """Merging adds B A, forgetting alpha / r."""
    model = fast._with_adapter(config, state, adapter, rank, alpha, targets)
    with torch.no_grad():
        for m in fast.lora_modules(model).values():
            m.scale = 1.0
    fast.merge_lora(model)
    with torch.no_grad():
        return model(idx)


def scale_ignores_alpha(config, state, adapter, idx, rank, alpha, targets):
    """The update is scaled by 1 / r: alpha lost."""
    return fast.lora_logits_and_grads(config, state, adapter, idx, rank, 1.0, targets)


def adapter_A_detached(config, state, adapter, idx, rank, alpha, targets):  # noqa: N802
    """A receives no gradient (the down-projection is computed from a detached A)."""
    original = fast.LoRALinear.forward

    def forward(self, x):
        y = self.base(x)
        low = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A.detach()), self.lora_B)
        return y + low * self.scale

    fast.LoRALinear.forward = forward
    try:
        out = fast.lora_logits_and_grads(config, state, adapter, idx, rank, alpha, targets)
    finally:
        fast.LoRALinear.forward = original
    # a parameter outside the graph has no .grad: report it as zeros, as an optimizer would see it
    return {k: torch.zeros_like(adapter[k[len("grad:"):]]) if v is None else v for k, v in out.items()}


def embeddings_left_trainable(config, rank, targets):
    """apply_lora forgets to freeze the token embedding."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    fast.apply_lora(model, targets, rank, alpha=2 * rank)
    model.wte.weight.requires_grad_(True)
    return fast.trainable_parameters(model)


def loads_what_fits(model, path):
    """A lenient loader: copies the keys that fit, ignores the rest."""
    from safetensors.torch import load_file

    stored = load_file(str(path))
    with torch.no_grad():
        for key, target in fast.adapter_state(model).items():
            if key in stored and stored[key].shape == target.shape:
                target.copy_(stored[key])


def _with_nf4(patch, weight, double_quant):
    saved = {name: getattr(nf4, name) for name in patch}
    for name, value in patch.items():
        setattr(nf4, name, value)
    try:
        return nf4.quantize_dequantize(weight, double_quant)
    finally:
        for name, value in saved.items():
            setattr(nf4, name, value)


def low_nibble_first(weight, double_quant):
    """Packs the first code of each pair in the low nibble."""
    out = nf4.quantize_dequantize(weight, double_quant)
    out["codes"] = (out["codes"] << 4) | (out["codes"] >> 4)
    return out


def uniform_int4_levels(weight, double_quant):
    """16 evenly spaced levels instead of normal quantiles."""
    code = torch.linspace(-1, 1, 16)
    return _with_nf4({"CODE": code, "_MIDPOINTS": (code[1:] + code[:-1]) / 2,
                      "_BYTE_TO_VALUES": torch.stack([code[torch.arange(256) >> 4], code[torch.arange(256) & 15]], 1)},
                     weight, double_quant)


def double_quant_drops_offset(weight, double_quant):
    """Dequantized scales forget to add back the mean of the absmax."""
    original = nf4.NF4Tensor.scales

    def scales(self):
        out = original(self)
        return out - self.scale_offset if self.scale_offset is not None else out

    nf4.NF4Tensor.scales = scales
    try:
        return nf4.quantize_dequantize(weight, double_quant)
    finally:
        nf4.NF4Tensor.scales = original


def block_of_32(weight, double_quant):
    """Scales per 32 weights instead of 64."""
    return _with_nf4({"BLOCK": 32}, weight, double_quant)
