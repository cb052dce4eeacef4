"""Cases and properties for project 11: target/draft pairs for the greedy checks, probability rows
and a chi-square test for the accept / reject rule, tiny models for sampled generation end to end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.gpt.model import GPT
from tests.cases.gpt import random_gpt

# ---------------------------------------------------------------- greedy: target / draft pairs


def pair_case(seed: int, prompt_len: int, max_new_tokens: int, k: int, draft: str = "other", n_layer: int = 2,
              n_head: int = 2, head_dim: int = 8, vocab_size: int = 65, slack: int = 0,
              id: str | None = None) -> dict[str, Any]:
    """A peaked random target and a draft: ``"other"`` (another random GPT, few drafts accepted) or
    ``"noisy-copy"`` (the target's weights plus noise, most drafts accepted). The block ends ``slack``
    positions after the last generated token (0: the generation fills the context exactly)."""
    block = prompt_len + max_new_tokens + slack
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, block_size=block, peaked=True)
    if draft == "other":
        d_config, d_state = random_gpt(seed + 7919, 1, n_head, head_dim, vocab_size, block_size=block, peaked=True)
    else:
        gen = torch.Generator().manual_seed(seed)
        d_config = dict(config)
        d_state = {k_: v + 0.02 * v.abs().mean() * torch.randn(v.shape, generator=gen) for k_, v in state.items()}
    prompt = torch.randint(vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    case = {"target_config": config, "target_state": state, "draft_config": d_config, "draft_state": d_state,
            "prompt": prompt, "max_new_tokens": max_new_tokens, "k": k}
    return case | ({"id": id} if id else {})


greedy_pairs = Cases(
    edge=[
        pair_case(0, 5, 20, 1, id="k-1"),
        pair_case(1, 5, 30, 4, draft="noisy-copy", id="mostly-accepted"),
        pair_case(2, 3, 6, 20, draft="noisy-copy", id="k-larger-than-remaining"),
        pair_case(3, 9, 1, 4, id="one-new-token"),
        pair_case(4, 1, 25, 3, draft="noisy-copy", id="one-token-prompt"),
        pair_case(5, 40, 24, 8, draft="noisy-copy", n_layer=3, n_head=4, id="long-prompt-fills-block"),
        pair_case(6, 6, 30, 5, draft="other", id="mostly-rejected"),
    ],
    strategy=st.builds(
        pair_case,
        seed=st.integers(0, 2**16),
        prompt_len=st.integers(1, 24),
        max_new_tokens=st.integers(1, 30),
        k=st.integers(1, 10),
        draft=st.sampled_from(["other", "noisy-copy"]),
        n_layer=st.integers(1, 3),
        n_head=st.sampled_from([1, 2, 4]),
        head_dim=st.sampled_from([4, 8]),
        slack=st.integers(0, 3),
    ),
)

# ---------------------------------------------------------------- accept / reject on fixed rows


def chi_square_p_value(samples: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that ``samples`` (N,) ids were drawn from ``probs`` (V,).

    Cells expected fewer than ``min_expected`` times are pooled into one; a sample on an id of
    probability 0 gives p = 0 (impossible under the hypothesis)."""
    probs = probs.double()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    if bool((counts[probs <= 0] > 0).any()):
        return 0.0
    expected = probs * samples.numel()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if exp.numel() < 2:
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(exp.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))  # the chi-square survival function


ALPHA = 1e-4  # per tested position; the samples are drawn at a fixed seed, so the check is deterministic
MIN_SAMPLES = 1000  # a position reached fewer times than this is not tested (its test would have no power)


def rows_case(seed: int, vocab_size: int, k: int, first_tv: float = 0.4, n_samples: int = 20_000,
              id: str | None = None) -> dict[str, Any]:
    """Target rows p_0 .. p_k (k + 1, V) and a deliberately different draft q_0 .. q_{k-1} (k, V):
    q_0 is far from p_0 (many rejections, so the residual is exercised), later q_i are near p_i (so
    the bonus row is reached often enough to be tested)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, vocab_size, generator=gen) * 1.5, dim=-1)
    other = torch.softmax(torch.randn(k, vocab_size, generator=gen) * 1.5, dim=-1)
    mix = torch.full((k, 1), 0.15)
    mix[0] = first_tv / max(0.5 * float((p[0] - other[0]).abs().sum()), 1e-6)  # q_0: about first_tv away from p_0
    q = (1 - mix.clamp(max=1.0)) * p[:k] + mix.clamp(max=1.0) * other
    case = {"target_probs": p, "draft_probs": q, "n_samples": n_samples, "seed": seed}
    return case | ({"id": id} if id else {})


def accepted_samples(accept: Callable[..., list[int]], target_probs: torch.Tensor, draft_probs: torch.Tensor,
                     n_samples: int, seed: int) -> list[list[int]]:
    """``n_samples`` outputs of ``accept`` with drafts drawn from ``draft_probs``, all at a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    k = draft_probs.shape[0]
    drafts = torch.multinomial(draft_probs, n_samples, replacement=True, generator=gen).T  # (N, k)
    return [accept(target_probs, draft_probs, drafts[i], gen) for i in range(n_samples)] if k else []


def follows_target_distribution(accept: Callable[..., list[int]], target_probs: torch.Tensor,
                                draft_probs: torch.Tensor, n_samples: int, seed: int) -> None:
    """The token at every output position i (0 .. k, the bonus included) is distributed as p_i: a
    chi-square test at ``ALPHA`` on each position reached at least ``MIN_SAMPLES`` times."""
    outs = accepted_samples(accept, target_probs, draft_probs, n_samples, seed)
    k = draft_probs.shape[0]
    assert all(1 <= len(o) <= k + 1 for o in outs), "an accept must return between 1 and k + 1 tokens"
    for i in range(k + 1):
        at_i = torch.tensor([o[i] for o in outs if len(o) > i], dtype=torch.long)
        if at_i.numel() < MIN_SAMPLES:
            assert i > 0, f"position 0 got {at_i.numel()} samples"
            continue
        p_value = chi_square_p_value(at_i, target_probs[i])
        assert p_value >= ALPHA, (f"position {i}: {at_i.numel()} tokens do not follow the target's row "
                                  f"(chi-square p = {p_value:.2e} < {ALPHA})")


accept_rows = Cases(
    edge=[
        rows_case(0, 8, 1, id="k-1-bonus-tested"),
        rows_case(1, 12, 3, id="k-3"),
        rows_case(2, 16, 2, first_tv=0.7, id="draft-far-from-target"),
        rows_case(3, 8, 2, first_tv=0.05, id="draft-near-target"),
    ],
    strategy=st.builds(
        rows_case,
        seed=st.integers(0, 2**16),
        vocab_size=st.integers(8, 16),
        k=st.integers(1, 3),
        first_tv=st.floats(0.05, 0.8),
    ),
)

# ---------------------------------------------------------------- sampled generation end to end


def tiny_pair_case(seed: int, n_samples: int = 1000, k: int = 2, temperature: float = 1.0,
                   id: str | None = None) -> dict[str, Any]:
    """A random (unpeaked) 8-id target, a different random draft, a 4-token prompt."""
    config, state = random_gpt(seed, 2, 2, 8, 8, block_size=8)
    d_config, d_state = random_gpt(seed + 1, 1, 2, 8, 8, block_size=8)
    with torch.no_grad():  # spread the target's rows so the draft disagrees with it visibly
        state = {n: (v * 40.0 if n == "lm_head.weight" or n == "wte.weight" else v) for n, v in state.items()}
    prompt = torch.randint(8, (1, 4), generator=torch.Generator().manual_seed(seed))
    case = {"target_config": config, "target_state": state, "draft_config": d_config, "draft_state": d_state,
            "prompt": prompt, "k": k, "temperature": temperature, "n_samples": n_samples, "seed": seed}
    return case | ({"id": id} if id else {})


@torch.no_grad()
def two_token_law(target_config: dict, target_state: dict, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """The target's exact joint law (V * V,) of the next two tokens after ``prompt``."""
    from impl.gpt.sampling import next_token_probs

    target = GPT.from_state(target_config, target_state)
    V = target.config.vocab_size
    first = next_token_probs(target(prompt)[:, -1], temperature)[0]  # (V,)
    seconds = torch.cat([prompt.expand(V, -1), torch.arange(V).unsqueeze(1)], dim=1)  # (V, T + 1)
    second = next_token_probs(target(seconds)[:, -1], temperature)  # (V, V): row = the first token
    return (first.unsqueeze(1) * second).flatten()


def generation_follows_target(sample: Callable[..., torch.Tensor], target_config: dict, target_state: dict,
                              draft_config: dict, draft_state: dict, prompt: torch.Tensor, k: int,
                              temperature: float, n_samples: int, seed: int) -> None:
    """The first two tokens sampled by speculative generation follow the target's joint law (64 cells,
    chi-square at ``ALPHA``)."""
    gen = torch.Generator().manual_seed(seed)
    target, draft = GPT.from_state(target_config, target_state), GPT.from_state(draft_config, draft_state)
    T = prompt.shape[1]
    pairs = []
    for _ in range(n_samples):
        out = sample(target, draft, prompt, 2, k, temperature=temperature, generator=gen)  # (1, T + 2)
        pairs.append(int(out[0, T]) * 8 + int(out[0, T + 1]))
    law = two_token_law(target_config, target_state, prompt, temperature)
    p_value = chi_square_p_value(torch.tensor(pairs), law)
    assert p_value >= ALPHA, f"two-token joint: chi-square p = {p_value:.2e} < {ALPHA} over {n_samples} samples"


tiny_pairs = Cases(
    edge=[tiny_pair_case(1, k=1, id="k-1-bonus"), tiny_pair_case(2, k=3, temperature=0.7, id="k-3-temperature-0.7")],
    strategy=None,  # each case runs thousands of generations: edge cases only
)
