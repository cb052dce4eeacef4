"""bitsandbytes' NF4 (``quantize_4bit`` / ``dequantize_4bit``, ``quant_type="nf4"``, block 64, with
or without double quantization of the scales) and its ``Linear4bit`` layer, on CPU: the peer our
``impl.lora.nf4`` is checked against. Shares no code with it."""

from __future__ import annotations

import torch


def code_values() -> torch.Tensor:
    """bitsandbytes' table of the 16 NF4 levels (float32, ascending)."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").float()


def quantize_dequantize(weight: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    """bitsandbytes' packed codes ((ceil(n/2),) uint8, high nibble first), the block scales it
    stores (dequantized to fp32, (n/64,)) and the dequantized weight (fp32, ``weight``'s shape)."""
    import bitsandbytes.functional as bnbf

    # flattened: bitsandbytes 0.50.2's CPU dequantize_4bit misplaces values of a 2-D weight whose rows
    # are not a multiple of 64 long (e.g. (128, 96): errors of 2.0 on unit-normal weights); the packed
    # codes of the flat and the 2-D call are identical, and the flat dequantization is right
    packed, state = bnbf.quantize_4bit(weight.float().reshape(-1), blocksize=64, quant_type="nf4",
                                       compress_statistics=double_quant)
    scales = state.absmax.float()
    if double_quant:
        scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    weight_out = bnbf.dequantize_4bit(packed, state).float().view(weight.shape)
    return {"codes": packed.reshape(-1), "scales": scales, "weight": weight_out}


def linear4bit_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
                       double_quant: bool = True) -> torch.Tensor:
    """``bnb.nn.Linear4bit`` (NF4, fp32 compute, optional double quantization) holding ``weight``
    (out, in), on ``x``. On CPU (bitsandbytes 0.50.2) ``in`` must be a multiple of 64 (see above)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit(weight.float().clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", blocksize=64)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.float().clone(), requires_grad=False)
    layer = layer.to("cpu")  # quantizes the weight
    with torch.no_grad():
        return layer(x.float())
