"""Mutants of project 14: GPTQ without its error propagation, with shifted groups, with a scale one bit
off; int8 layers with a scale one bit off or no outlier decomposition; 4-bit packing in the wrong nibble."""

from __future__ import annotations

from unittest.mock import patch

import torch
import torch.nn as nn

from impl.ptq import fast, llm_int8
from impl.ptq.gptq import solve_layer
from impl.ptq.quant import pack_int4


def _fast_without_propagation(weight, H, scheme, act_order=False):
    # only the diagonal of H: the inverse's off-diagonal rows are 0, so no column's error reaches another
    return fast.gptq_fast(weight, torch.diag(torch.diag(H)), scheme, act_order=act_order)


def hessian_not_updated(weight, inputs, bits, group_size, symmetric, act_order):
    return solve_layer(_fast_without_propagation, weight, inputs, bits, group_size, symmetric, act_order)


def wrong_group_boundary(weight, inputs, bits, group_size, symmetric, act_order):
    real = fast.column_groups

    def shifted(scheme, n, perm):  # groups start one column late (the first group is one column short)
        groups = real(scheme, n, perm)
        return torch.clamp((perm - 1) // (scheme.group_size or n), min=0) if scheme.group_size else groups

    with patch.object(fast, "column_groups", shifted):
        return fast.gptq_layer(weight, inputs, bits, group_size, symmetric, act_order)


def gptq_scale_off_by_one_bit(weight, inputs, bits, group_size, symmetric, act_order):
    real = fast.group_params

    def halved(values, scheme):
        scale, zero = real(values, scheme)
        return scale / 2, zero

    with patch.object(fast, "group_params", halved):
        return fast.gptq_layer(weight, inputs, bits, group_size, symmetric, act_order)


def _linear(weight, bias):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def int8_scale_off_by_one_bit(weight, bias, x, threshold):
    layer = llm_int8.Int8OutlierLinear.from_linear(_linear(weight, bias), threshold)
    layer.weight_scale /= 2  # codes taken on the full grid, read back at half the step
    return layer(x)


@torch.no_grad()
def outliers_quantized(weight, bias, x, threshold):
    return llm_int8.Int8OutlierLinear.from_linear(_linear(weight, bias), float("inf"))(x)


def low_nibble_first(q):
    packed = pack_int4(q)
    return (packed << 4) | (packed >> 4)
