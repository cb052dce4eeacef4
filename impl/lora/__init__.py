"""Project 5: LoRA from scratch, our NF4 4-bit weights, and QLoRA (LoRA over a frozen NF4 base)."""

from impl.lora.fast import (
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from impl.lora.nf4 import NF4Linear, NF4Tensor, dequantize_nf4, quantize_model, quantize_nf4

__all__ = [
    "LoRALinear", "apply_lora", "load_adapter", "merge_lora", "save_adapter", "trainable_parameters",
    "NF4Linear", "NF4Tensor", "dequantize_nf4", "quantize_model", "quantize_nf4",
]
