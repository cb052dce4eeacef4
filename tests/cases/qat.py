"""Cases and properties for project 16: weights to fake-quantize (own or given ranges, exact ties,
clamped values), small GPTs to export, and the straight-through and torchao properties."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.ptq.quant import Scheme, qparams
from reference import torchao_qat
from tests.cases.gpt import random_gpt


def weight_case(seed: int, rows: int, cols: int, bits: int, group_size: int | None, symmetric: bool,
                ranges: str = "own", magnitude: float = 1.0, dtype: torch.dtype = torch.float32,
                id: str | None = None) -> dict[str, Any]:
    """A random (rows, cols) weight. ``ranges``: "own" (scales from the weight itself), "clipped" (given
    scales of half the weight's range: many codes clamped), "ties" (values on half steps of a grid
    whose scale is exactly 1: round half to even decides, and the top edge rounds past qmax)."""
    gen = torch.Generator().manual_seed(seed)
    scheme = Scheme(bits, group_size, symmetric)
    x = torch.randn(rows, cols, generator=gen) * magnitude
    case: dict[str, Any] = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    if ranges == "ties":
        half = (scheme.qmax - scheme.qmin) / 2  # the grid spans +-half steps: scale 1 when absmax = half
        x = torch.randint(-2 * int(half), 2 * int(half) + 1, (rows, cols), generator=gen).float() / 2
        g = group_size or cols
        x[:, ::g] = half  # every group reaches +half (symmetric) ...
        if not symmetric:
            x[:, 1::g] = -half  # ... and -half: an asymmetric range of 2 * half steps, scale 1 too
    if ranges == "clipped":
        scale, zero = qparams(x * 0.5, scheme)
        case |= {"scale": scale, "zero": zero}
    case |= {"x": x, "dtype": dtype}
    return case | ({"id": id} if id else {})


_SHAPES = st.sampled_from([(1, 8), (3, 16), (5, 32), (8, 64), (2, 96)])


@st.composite
def _weight_cases(draw) -> dict[str, Any]:
    rows, cols = draw(_SHAPES)
    group_size = draw(st.sampled_from([None] + [g for g in (2, 4, 8, 16, 32) if cols % g == 0]))
    return weight_case(draw(st.integers(0, 2**16)), rows, cols, draw(st.integers(2, 8)), group_size,
                       draw(st.booleans()), draw(st.sampled_from(["own", "clipped", "ties"])),
                       draw(st.sampled_from([1e-3, 0.02, 1.0, 50.0])))


weights = Cases(
    edge=[
        weight_case(0, 4, 16, 4, None, True, "ties", id="int4-ties-per-channel-sym"),
        weight_case(1, 4, 32, 4, 8, False, "ties", id="int4-ties-g8-asym"),
        weight_case(2, 8, 64, 4, 32, True, "clipped", id="int4-g32-clipped-ranges"),
        weight_case(3, 6, 48, 3, 16, False, "clipped", id="int3-g16-asym-clipped"),
        weight_case(4, 16, 128, 4, 32, True, id="int4-g32-sym"),
        weight_case(5, 16, 128, 3, None, True, magnitude=0.02, id="int3-per-channel-weight-sized"),
        weight_case(6, 8, 64, 8, None, False, id="int8-per-channel-asym"),
        weight_case(7, 5, 40, 2, 8, True, id="int2-g8-sym"),
        weight_case(8, 4, 32, 4, 16, True, dtype=torch.bfloat16, id="bf16-weight"),
    ],
    strategy=_weight_cases(),
)


def _expected_mask(x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                   scale: torch.Tensor | None, zero: torch.Tensor | None) -> torch.Tensor:
    """The STE's pass-through set by definition: round(x / scale) + zero in [qmin, qmax], in fp32."""
    scheme = Scheme(bits, group_size, symmetric)
    if scale is None:
        scale, zero = qparams(x, scheme)
    g = x.float().reshape(x.shape[0], -1, group_size or x.shape[-1])
    code = torch.round(g / scale.float()[..., None]) + zero.float()[..., None]
    return ((code >= scheme.qmin) & (code <= scheme.qmax)).reshape(x.shape)


def straight_through_rule(fn: Callable, x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                          scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> None:
    """Property: the gradient ``fn`` sends back to ``x`` is the upstream gradient, unchanged, where
    ``round(x / scale) + zero`` lies in [qmin, qmax] and exactly 0 where the code was clamped; the
    scales get none (they are computed from the weight, not learnt)."""
    leaf = x.detach().clone().requires_grad_(True)
    if scale is not None:
        scale = scale.detach().clone().requires_grad_(True)
    out = fn(leaf, bits, group_size, symmetric, scale, zero)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    out.backward(upstream)
    mask = _expected_mask(x, bits, group_size, symmetric, scale, zero)
    expected = torch.where(mask, upstream, torch.zeros_like(upstream))
    assert leaf.grad is not None, "no gradient reached the weight"
    wrong = leaf.grad != expected
    assert not wrong.any(), (f"{int(wrong.sum())} of {x.numel()} gradients break the STE rule "
                             f"({int((~mask).sum())} codes clamped); first at {wrong.nonzero()[0].tolist()}: "
                             f"got {leaf.grad[wrong][0].item()}, expected {expected[wrong][0].item()}")
    assert scale is None or scale.grad is None or not scale.grad.any(), "a gradient reached the given scales"


def _symmetric_case(seed: int, rows: int, cols: int, bits: int, group_size: int | None, magnitude: float = 1.0,
                    id: str | None = None) -> dict[str, Any]:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    case = {"x": x, "bits": bits, "group_size": group_size, "symmetric": True}
    return case | ({"id": id} if id else {})


symmetric_weights = Cases(
    edge=[
        weight_case(10, 4, 16, 4, None, True, "ties", id="int4-ties-per-channel"),
        weight_case(11, 8, 64, 4, 32, True, "ties", id="int4-ties-g32"),
        _symmetric_case(12, 64, 256, 4, 32, 0.02, id="int4-g32-weight-sized"),
        _symmetric_case(13, 64, 256, 3, 128, 0.02, id="int3-g128"),
        _symmetric_case(14, 32, 64, 8, None, id="int8-per-channel"),
        _symmetric_case(15, 16, 64, 2, 16, id="int2-g16"),
    ],
    strategy=st.builds(_symmetric_case, seed=st.integers(0, 2**16), rows=st.integers(1, 24),
                       cols=st.sampled_from([16, 32, 64]), bits=st.integers(2, 8),
                       group_size=st.sampled_from([None, 2, 8, 16]), magnitude=st.sampled_from([1e-3, 1.0, 30.0])),
)


def agrees_with_torchao(fn: Callable, x: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> None:
    """Property: ``fn``'s fake-quantized weight equals torchao's ``IntxFakeQuantizer`` (same config) with
    exactly the same scales; an element may differ only where torchao's ``x * (1 / scale)`` and our
    ``x / scale`` are different fp32 numbers, and then by one grid step (a tie decided by the last bit)."""
    theirs = torchao_qat.fake_quantize(x, bits, group_size, symmetric)
    with torch.no_grad():
        ours = fn(x, bits, group_size, symmetric)
    scale = theirs["scale"]
    ours_scale, _ = qparams(x, Scheme(bits, group_size, symmetric))
    assert torch.equal(scale, ours_scale), f"scales differ by up to {(scale - ours_scale).abs().max().item():.3g}"
    s = scale.repeat_interleave(group_size or x.shape[-1], dim=1)
    formulas_differ = (x / s) != (x * (1.0 / s))
    differ = ours != theirs["out"]
    unexplained = differ & ~formulas_differ
    assert not unexplained.any(), (f"{int(unexplained.sum())} of {x.numel()} values differ from torchao's where "
                                   f"both quantize the same fp32 number; first at {unexplained.nonzero()[0].tolist()}")
    steps = (ours - theirs["out"]).abs()[differ] / s[differ]
    assert ((steps - 1).abs() < 1e-4).all(), f"a value is {steps.max().item():.3g} grid steps from torchao's"


def model_case(seed: int, batch: int, length: int, n_layer: int, n_head: int, head_dim: int, bits: int,
               group_size: int | None, symmetric: bool, bias: bool = True, vocab_size: int = 40,
               id: str | None = None) -> dict[str, Any]:
    """A random GPT (weights scaled up so 2-4 bit rounding moves the logits visibly) and tokens."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    state = {k: v * 5 if k.endswith(".weight") and v.dim() == 2 else v for k, v in state.items()}
    idx = torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    case = {"config": config, "state": state, "idx": idx, "bits": bits, "group_size": group_size,
            "symmetric": symmetric}
    return case | ({"id": id} if id else {})


models = Cases(
    edge=[
        model_case(0, 2, 12, 2, 2, 8, 4, 8, True, id="int4-g8-sym"),
        model_case(1, 1, 9, 1, 2, 16, 3, None, False, id="int3-per-channel-asym"),
        model_case(2, 2, 7, 2, 4, 4, 8, 16, True, bias=False, id="int8-g16-no-bias"),
        model_case(3, 1, 16, 1, 1, 32, 2, 32, False, id="int2-g32-asym"),
    ],
    strategy=st.builds(model_case, seed=st.integers(0, 2**16), batch=st.integers(1, 2), length=st.integers(2, 12),
                       n_layer=st.integers(1, 2), n_head=st.sampled_from([1, 2]), head_dim=st.sampled_from([8, 16]),
                       bits=st.integers(2, 8), group_size=st.sampled_from([None, 4, 8]), symmetric=st.booleans(),
                       bias=st.booleans()),
)
