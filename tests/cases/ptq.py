"""Cases for project 14 (post-training quantization): GPTQ layers with correlated inputs, int4 codes to
pack, and linear layers with outlier activations for the int8 comparisons with bitsandbytes."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.ptq.gptq import hessian, reconstruction_error
from impl.ptq.quant import Scheme, quantize_dequantize, unpack_int4


def correlated_inputs(gen: torch.Generator, n: int, width: int, rank: int) -> torch.Tensor:
    """(n, width) inputs whose features are mixtures of ``rank`` sources plus 10% noise: a Hessian far from
    diagonal, where GPTQ's error propagation has something to exploit (real activations are like this)."""
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, width, generator=gen) + 0.1 * torch.randn(
        n, width, generator=gen)


def gptq_case(seed: int, out: int, width: int, bits: int, group_size: int | None, symmetric: bool, act_order: bool,
              n: int = 256, id: str | None = None) -> dict[str, Any]:
    """A layer (out, width) of small weights, its calibration inputs (n, width) and a GPTQ setting, in float64:
    GPTQ propagates each column's rounding into every later column, so a one-ulp difference between two
    solvers can flip a code and change everything after it; in float64 that is vanishingly rare."""
    gen = torch.Generator().manual_seed(seed)
    case = {"weight": 0.05 * torch.randn(out, width, generator=gen),
            "inputs": correlated_inputs(gen, n, width, max(2, width // 4)),
            "bits": bits, "group_size": group_size, "symmetric": symmetric, "act_order": act_order,
            "dtype": torch.float64}
    return case | ({"id": id} if id else {})


_gptq_strategy = st.builds(
    gptq_case, seed=st.integers(0, 2**16), out=st.integers(16, 64), width=st.sampled_from([32, 64, 96, 128]),
    bits=st.sampled_from([3, 4, 8]), group_size=st.sampled_from([None, 16, 32]), symmetric=st.booleans(),
    act_order=st.booleans())

gptq_layers = Cases(
    edge=[
        gptq_case(0, 16, 32, 4, None, True, False, id="int4-per-channel"),
        gptq_case(1, 24, 64, 4, 16, False, False, id="int4-g16-asym"),
        gptq_case(2, 24, 64, 4, 16, False, True, id="int4-g16-asym-act-order"),
        gptq_case(3, 32, 96, 3, 32, True, True, id="int3-g32-act-order"),
        gptq_case(4, 16, 160, 8, 32, True, False, id="int8-g32-more-than-one-lazy-block"),
        gptq_case(5, 16, 160, 4, 32, False, True, id="int4-g32-act-order-more-than-one-lazy-block"),
    ],
    strategy=_gptq_strategy,
)


def gptq_beats_rtn(fn, weight, inputs, bits, group_size, symmetric, act_order) -> None:
    """GPTQ's reconstruction error ``||X W^T - X Q^T||^2`` on its calibration inputs is at most round-to-nearest's."""
    scheme = Scheme(bits, group_size, symmetric)
    H = hessian(inputs)
    gptq = reconstruction_error(weight, fn(weight, inputs, bits, group_size, symmetric, act_order)["weight"], H)
    rtn = reconstruction_error(weight, quantize_dequantize(weight, scheme), H)
    assert gptq <= rtn, f"GPTQ's error {gptq:.4g} exceeds round-to-nearest's {rtn:.4g} ({scheme.label()})"


def codes_case(seed: int, rows: int, width: int, signed: bool, id: str | None = None) -> dict[str, Any]:
    """Random 4-bit codes (rows, width): int8 in -8..7 when ``signed``, else uint8 in 0..15; both extremes
    appear in every case."""
    gen = torch.Generator().manual_seed(seed)
    lo = -8 if signed else 0
    q = torch.randint(lo, lo + 16, (rows, width), generator=gen)
    q.view(-1)[:2] = torch.tensor([lo, lo + 15])[: q.numel()]
    case = {"q": q.to(torch.int8 if signed else torch.uint8), "signed": signed}
    return case | ({"id": id} if id else {})


int4_codes = Cases(
    edge=[
        codes_case(0, 1, 1, True, id="one-signed-code"),
        codes_case(1, 3, 7, True, id="odd-width-signed"),
        codes_case(2, 3, 7, False, id="odd-width-unsigned"),
        codes_case(3, 4, 128, False, id="even-width-unsigned"),
        codes_case(4, 2, 33, True, id="odd-width-33"),
    ],
    strategy=st.builds(codes_case, seed=st.integers(0, 2**16), rows=st.integers(1, 5), width=st.integers(1, 70),
                       signed=st.booleans()),
)


def pack_roundtrip_exact(fn, q, signed) -> None:
    """``unpack_int4(fn(q))`` gives back ``q`` exactly, in ceil(width / 2) bytes per row."""
    packed = fn(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*q.shape[:-1], (q.shape[-1] + 1) // 2), \
        f"packed shape {tuple(packed.shape)} {packed.dtype} for codes {tuple(q.shape)}"
    back = unpack_int4(packed, q.shape[-1], signed)
    assert back.dtype == q.dtype and torch.equal(back, q), "unpack(pack(q)) differs from q"


def linear_case(seed: int, out: int, width: int, tokens: int, outliers: int, outlier_scale: float,
                threshold: float = 6.0, bias: bool = True, id: str | None = None) -> dict[str, Any]:
    """A linear layer (out, width) and inputs (2, tokens, width) ~N(0, 1) with ``outliers`` feature columns
    scaled to about ``outlier_scale`` (LLM.int8()'s emergent features)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, width, generator=gen)
    cols = torch.randperm(width, generator=gen)[:outliers]
    x[..., cols] *= outlier_scale
    case = {"weight": 0.05 * torch.randn(out, width, generator=gen),
            "bias": 0.1 * torch.randn(out, generator=gen) if bias else None, "x": x, "threshold": threshold}
    return case | ({"id": id} if id else {})


def int8_bound(weight: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The largest difference two int8 LLM.int8() layers may show on ``x`` (N, in): (N, out).

    Each side rounds every activation of a regular column to a grid of step ``amax_row / 127`` (or finer) and
    every weight to a grid of step ``wmax_row / 127`` (or finer), so each side's error is at most half a step
    per factor: ``sum_k |x_k| wmax / 254 + |w_k| amax / 254 + the product of both``. Two sides differ by at
    most the sum of their errors. bitsandbytes also casts activations and weights to fp16 first (relative
    2^-11 each), counted as ``2^-10 sum_k |x_k| |w_k|``. The bound is a worst case (errors of equal sign)."""
    outlier = (x.abs() >= threshold).any(dim=0) if threshold > 0 else torch.zeros(x.shape[1], dtype=torch.bool)
    regular = (~outlier).double()  # (in,)
    half_a = x.masked_fill(outlier, 0).abs().amax(dim=1, keepdim=True).double() / 254  # (N, 1)
    half_w = weight.abs().amax(dim=1).double()[None, :] / 254  # (1, out)
    ax, aw = x.abs().double(), weight.abs().double()
    per_side = (ax.sum(dim=1, keepdim=True) * half_w  # weight rounding, every column
                + half_a * (aw @ regular)[None, :]  # activation rounding, regular columns
                + half_a * half_w * regular.sum())  # both at once
    return 2 * per_side + 2.0**-10 * (ax @ aw.T)


def matches_bitsandbytes_int8(fn, weight, bias, x, threshold) -> None:
    """``fn``'s output is within ``int8_bound`` of bitsandbytes' ``Linear8bitLt`` with the same threshold."""
    from reference.bnb_int8 import linear8bit_forward

    ours = fn(weight, bias, x, threshold).reshape(-1, weight.shape[0]).double()
    theirs = linear8bit_forward(weight, bias, x, threshold).reshape(-1, weight.shape[0]).double()
    bound = int8_bound(weight.double(), x.reshape(-1, x.shape[-1]).double(), threshold) * 1.001 + 1e-6
    excess = ((ours - theirs).abs() - bound).max().item()
    assert excess <= 0, (f"int8 outputs differ from bitsandbytes' by up to {(ours - theirs).abs().max().item():.4g}, "
                         f"{excess:.3g} past the rounding bound")


_linear_strategy_args = dict(seed=st.integers(0, 2**16), out=st.sampled_from([8, 24, 64]),
                             width=st.sampled_from([16, 64, 96]), tokens=st.integers(1, 9))

llm_int8_linears = Cases(
    edge=[
        linear_case(0, 32, 64, 5, 0, 1.0, id="no-outliers"),
        linear_case(1, 32, 64, 5, 2, 20.0, id="two-outlier-columns"),
        linear_case(2, 48, 128, 9, 1, 300.0, id="one-huge-outlier-column"),
        linear_case(3, 16, 64, 1, 3, 10.0, bias=False, id="one-token-no-bias"),
    ],
    strategy=st.builds(linear_case, outliers=st.integers(0, 3), outlier_scale=st.sampled_from([1.0, 10.0, 100.0]),
                       **_linear_strategy_args),
)

w8a8_linears = Cases(
    edge=[
        linear_case(0, 32, 64, 5, 0, 1.0, threshold=0.0, id="plain"),
        linear_case(1, 32, 64, 5, 2, 20.0, threshold=0.0, id="outlier-columns-quantized-too"),
        linear_case(3, 16, 64, 1, 0, 1.0, threshold=0.0, bias=False, id="one-token-no-bias"),
    ],
    strategy=st.builds(linear_case, outliers=st.just(0), outlier_scale=st.just(1.0), threshold=st.just(0.0),
                       **_linear_strategy_args),
)
