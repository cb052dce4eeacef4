"""Cases for project 6: summed log-probs for the loss, and tiny GPT pairs for the forward passes."""

from __future__ import annotations

import math
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from tests.cases.gpt import random_gpt


def logp_case(seed: int, batch: int, scale: float, beta: float, loss_type: str, lengths: bool = True,
              equal: bool = False, id: str | None = None) -> dict[str, Any]:
    """Four (batch,) log-prob tensors (negative, spread ``scale``), completion lengths 1..12 (or None)."""
    gen = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(batch, generator=gen) * scale) for _ in range(4)]
    if equal:  # policy == reference: every log ratio is exactly 0
        logps[2], logps[3] = logps[0].clone(), logps[1].clone()
    counts = [torch.randint(1, 13, (batch,), generator=gen) for _ in range(2)] if lengths else [None, None]
    case = {"policy_chosen": logps[0], "policy_rejected": logps[1], "ref_chosen": logps[2],
            "ref_rejected": logps[3], "beta": beta, "loss_type": loss_type,
            "chosen_tokens": counts[0], "rejected_tokens": counts[1]}
    return case | ({"id": id} if id else {})


logps = Cases(
    edge=[
        logp_case(0, 1, 10.0, 0.1, "sigmoid", id="one-pair"),
        logp_case(1, 6, 10.0, 0.1, "sigmoid", equal=True, id="policy-is-reference"),
        logp_case(2, 5, 400.0, 0.5, "sigmoid", id="saturated-sigmoid"),  # |beta * delta| up to ~200
        logp_case(3, 4, 5.0, 0.01, "sigmoid", lengths=False, id="tiny-beta"),
        logp_case(4, 4, 20.0, 0.1, "ipo", id="ipo-averaged-per-token"),
        logp_case(5, 3, 20.0, 1.0, "ipo", lengths=False, id="ipo-summed"),
        logp_case(6, 4, 10.0, 0.1, "ipo", equal=True, id="ipo-policy-is-reference"),
    ],
    strategy=st.builds(
        logp_case,
        seed=st.integers(0, 2**16),
        batch=st.integers(1, 9),
        scale=st.sampled_from([0.5, 10.0, 100.0]),
        beta=st.sampled_from([0.01, 0.1, 0.5, 2.0]),
        loss_type=st.sampled_from(["sigmoid", "ipo"]),
        lengths=st.booleans(),
    ),
)


def pair_case(seed: int, prompt_lengths: list[int], chosen_lengths: list[int], rejected_lengths: list[int],
              beta: float = 0.1, loss_type: str = "sigmoid", same_model: bool = False, n_layer: int = 2,
              n_head: int = 2, head_dim: int = 8, vocab_size: int = 40, id: str | None = None) -> dict[str, Any]:
    """A tiny policy GPT, a reference GPT (another seed, or the same weights with ``same_model``) and pairs
    of random token sequences of the given lengths (chosen and rejected differ in length: padding)."""
    block = max(p + max(c, r) for p, c, r in zip(prompt_lengths, chosen_lengths, rejected_lengths, strict=True))
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, block)
    _, ref_state = random_gpt(seed + 1, n_layer, n_head, head_dim, vocab_size, block)
    gen = torch.Generator().manual_seed(seed)

    def seqs(lengths: list[int]) -> list[list[int]]:
        return [torch.randint(vocab_size, (n,), generator=gen).tolist() for n in lengths]

    case = {"config": config, "state": state, "ref_state": state if same_model else ref_state,
            "prompts": seqs(prompt_lengths), "chosen": seqs(chosen_lengths), "rejected": seqs(rejected_lengths),
            "beta": beta, "loss_type": loss_type}
    return case | ({"id": id} if id else {})


@st.composite
def _pair_cases(draw: st.DrawFn, same_model: bool) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    lengths = st.lists(st.integers(1, 9), min_size=n, max_size=n)
    return pair_case(draw(st.integers(0, 2**16)), draw(lengths), draw(lengths), draw(lengths),
                     beta=draw(st.sampled_from([0.05, 0.1, 0.5])),
                     loss_type="sigmoid" if same_model else draw(st.sampled_from(["sigmoid", "ipo"])),
                     same_model=same_model, n_layer=draw(st.integers(1, 2)), n_head=draw(st.sampled_from([1, 2])))


pairs = Cases(
    edge=[
        pair_case(0, [3], [1], [1], id="one-pair-one-token-answers"),
        pair_case(1, [5, 2, 8], [1, 6, 3], [4, 1, 3], id="ragged-three-pairs"),
        pair_case(2, [1, 1], [9, 2], [2, 9], beta=0.5, id="one-token-prompts"),
        pair_case(3, [6, 4], [3, 5], [7, 1], loss_type="ipo", id="ipo"),
    ],
    strategy=_pair_cases(False),
)

same_model_pairs = Cases(
    edge=[
        pair_case(10, [3], [1], [1], same_model=True, id="one-pair"),
        pair_case(11, [5, 2, 8], [1, 6, 3], [4, 1, 3], same_model=True, id="ragged-three-pairs"),
        pair_case(12, [4, 4], [2, 8], [8, 2], beta=2.0, same_model=True, id="large-beta"),
    ],
    strategy=_pair_cases(True),
)


def loss_is_ln2_with_zero_rewards(fn: Any, **case: Any) -> None:
    """Property: with the policy equal to the reference, every implicit reward is 0 and the sigmoid loss
    is ln 2 (sigmoid(0) = 1/2)."""
    out = fn(**case)
    assert abs(out["loss"].item() - math.log(2)) < 1e-6, f"loss {out['loss'].item()!r} is not ln 2"
    assert out["chosen_rewards"].abs().max().item() < 1e-6, f"chosen rewards {out['chosen_rewards']} are not 0"
    assert out["rejected_rewards"].abs().max().item() < 1e-6, f"rejected rewards {out['rejected_rewards']} are not 0"
