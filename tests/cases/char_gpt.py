"""Cases for project 1: the same weights through naive, fast and HF GPT-2, unpadded and padded."""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.cases import Cases
from reference import hf_gpt2
from tests.cases.gpt import logit_case, logit_strategy, ragged_case, ragged_strategy

logits = Cases(
    edge=[
        logit_case(0, 1, 1, 1, 1, 4, id="one-token"),
        logit_case(1, 2, 64, 4, 4, 32, id="nanogpt-recipe-shape"),
        logit_case(2, 3, 17, 2, 3, 8, vocab_size=7, id="odd-heads-and-length"),
        logit_case(3, 1, 33, 2, 2, 16, bias=False, id="no-bias"),
        logit_case(4, 2, 31, 2, 4, 16, dtype=torch.bfloat16, id="bf16"),
    ],
    strategy=logit_strategy(),
)

# Rows of different lengths in one batch: an unpadded row, a row of one real token, and padding
# on the left (prompts for generation) or the right (training batches).
ragged = Cases(
    edge=[
        ragged_case(10, [9, 4, 1], "left", 2, 3, 4, vocab_size=11, id="left-padded"),
        ragged_case(10, [9, 4, 1], "right", 2, 3, 4, vocab_size=11, id="right-padded"),
        ragged_case(11, [5, 2], "left", 3, 2, 8, extra_padding=3, id="left-padded-every-row"),
        ragged_case(12, [6, 13], "right", 2, 4, 4, bias=False, extra_padding=2, id="right-padded-every-row-no-bias"),
        ragged_case(13, [7], "left", 2, 2, 8, id="one-row-no-padding"),
        ragged_case(14, [20, 3, 11, 1], "left", 2, 4, 16, dtype=torch.bfloat16, id="left-padded-bf16"),
    ],
    strategy=ragged_strategy(),
)

RTOL = ATOL = 1e-5  # DESIGN.md's fp32 rule, as the allclose checks use it
K, FLOOR = 2.0, 1e-3  # low precision: at most K x HF's own error in that dtype, plus FLOOR


def equals_hf_at_real_positions(fn: Callable, config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
                                attention_mask: torch.Tensor) -> None:
    """Property: ``fn``'s logits of a padded batch are finite everywhere and, at every real position,
    equal HF ``GPT2LMHeadModel``'s (given the same ``attention_mask`` and the position ids HF's
    ``generate`` uses) run in float64: fp32 within rtol/atol 1e-5, bf16/fp16 within 2x HF's own
    error in that dtype + 1e-3. Padding positions are not compared: what a row computes there
    is nobody's output (HF and we put padding at different positions)."""
    out = fn(config, state, idx, attention_mask)
    assert out.shape == (*idx.shape, config["vocab_size"]), f"logits of shape {tuple(out.shape)}"
    assert torch.isfinite(out).all(), "non-finite logits (a padding query that sees no key gives NaN)"
    real = attention_mask.bool()
    truth = hf_gpt2.logits(config, {k: v.double() for k, v in state.items()}, idx, attention_mask)[real]
    got = out[real].double()
    err = (got - truth).abs().max().item()
    if out.dtype in (torch.bfloat16, torch.float16):
        hf_err = (hf_gpt2.logits(config, state, idx, attention_mask)[real].double() - truth).abs().max().item()
        assert err <= K * hf_err + FLOOR, (
            f"max error {err:.3g} at real positions exceeds {K} x HF's own {hf_err:.3g} + {FLOOR}")
    else:
        assert torch.allclose(got, truth, rtol=RTOL, atol=ATOL), (
            f"max error {err:.3g} vs HF in float64 at real positions exceeds rtol {RTOL}, atol {ATOL}")
