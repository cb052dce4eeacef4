"""Speculative decoding with a draft model, both models through a KV cache (Leviathan et al. 2023,
Chen et al. 2023).

One round, with n tokens emitted so far (the target's cache holds the first n - 1, the draft's
cache at most n):
1. draft: the draft model proposes k tokens autoregressively through its own cache (k forwards of
   one token each, the first also feeding whatever the draft has not seen yet);
2. verify: the target scores the last emitted token and the k drafts in ONE forward of T = k + 1
   tokens: k + 1 rows of logits, row i for draft position i, row k for the bonus token;
3. accept (``verify.greedy_accept`` at temperature 0, else ``verify.sampled_accept``): a accepted
   drafts plus one token from the target, so every round emits between 1 and k + 1 tokens;
4. roll back: both caches ``truncate`` to the kept length (the target keeps the last emitted token
   and the a accepted drafts; the new token is fed in the next round), nothing is copied.

Adaptive k (``adaptive=True``): k starts at ``k``; a round whose drafts were all accepted grows it by
one (the draft is on a predictable stretch), a round that kept fewer than half shrinks it by one
(drafting further would be wasted), bounded to [1, ``k_max``].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from impl.gpt.model import GPT
from impl.gpt.sampling import next_token_probs
from impl.kv_cache.fast import KVCache, generate
from impl.speculative_decoding.verify import greedy_accept, sampled_accept


@dataclass
class Stats:
    """What a speculative generation did: drafted and accepted tokens, forwards of each model."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    ks: list[int] = field(default_factory=list)  # the k of every round (adaptive k moves it)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        """Accepted drafts per verification round."""
        return self.accepted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        """The figures as plain data (for a workload's details)."""
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_per_round": round(self.mean_accepted_per_round, 4)}


@dataclass
class Speculation:
    """What ``speculative_generate`` returns."""

    tokens: torch.Tensor  # (1, T + max_new_tokens): the prompt, then the generated ids
    stats: Stats


def next_k(k: int, n_accepted: int, n_drafted: int, k_max: int) -> int:
    """Adaptive k: +1 after a fully accepted round, -1 after one that kept fewer than half, in [1, k_max]."""
    if n_accepted == n_drafted:
        return min(k + 1, k_max)
    if 2 * n_accepted < n_drafted:
        return max(k - 1, 1)
    return k


def _check_pair(target: GPT, draft: GPT, prompt: torch.Tensor, total: int) -> None:
    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one request: prompt must be (1, T), got {tuple(prompt.shape)}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocabulary {draft.config.vocab_size} != target's {target.config.vocab_size}: "
                         "the two models must share one tokenizer")
    for name, model in (("target", target), ("draft", draft)):
        if total > model.config.block_size:
            raise ValueError(f"prompt + new tokens = {total} exceeds the {name}'s block_size {model.config.block_size}")


@torch.no_grad()
def speculative_generate(
    target: GPT,
    draft: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    k: int = 4,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    adaptive: bool = False,
    k_max: int = 8,
) -> Speculation:
    """``max_new_tokens`` tokens after ``prompt`` (1, T), drafted ``k`` at a time by ``draft`` and
    verified by ``target`` in one forward per round; returns the tokens and the ``Stats``.

    At ``temperature == 0`` the tokens are exactly target-only greedy decoding's; otherwise they are
    distributed as the target's ``next_token_probs(temperature, top_k, top_p)`` sampling (draws from
    ``generator``). ``adaptive``: k moves between 1 and ``k_max`` (``next_k``)."""
    T = prompt.shape[1]
    _check_pair(target, draft, prompt, T + max_new_tokens)
    greedy = temperature == 0
    t_cache = KVCache.for_model(target, 1, T + max_new_tokens)
    d_cache = KVCache.for_model(draft, 1, T + max_new_tokens)
    stats = Stats()
    if T > 1:  # the target's cache holds every emitted token but the last, which each round feeds
        target(prompt[:, :-1], cache=t_cache)
        stats.target_forwards += 1
    tokens = prompt[0].tolist()
    k_now = k
    while len(tokens) < T + max_new_tokens:
        n = len(tokens)
        kk = min(k_now, T + max_new_tokens - n - 1)  # a round emits up to kk + 1 tokens: never past the end
        drafts, draft_probs = [], []
        feed = torch.tensor([tokens[d_cache.position:]], device=prompt.device)  # what the draft has not seen
        for _ in range(kk):
            logits = draft(feed, cache=d_cache)[:, -1, :]  # (1, V)
            if greedy:
                feed = logits.argmax(dim=-1, keepdim=True)  # (1, 1): no host sync between draft steps
            else:
                q = next_token_probs(logits, temperature, top_k, top_p)  # the same warpers as the target's
                feed = torch.multinomial(q, 1, generator=generator)
                draft_probs.append(q[0])
            drafts.append(feed[0, 0])
        stats.draft_forwards += kk
        last = torch.tensor([tokens[-1]], device=prompt.device)
        drafted = torch.stack(drafts) if drafts else last[:0]  # (kk,)
        logits = target(torch.cat([last, drafted]).unsqueeze(0), cache=t_cache)[0]  # (kk + 1, V): ONE forward
        if greedy:
            new = greedy_accept(logits, drafted)
        else:
            q_rows = torch.stack(draft_probs) if draft_probs else logits[:0]
            new = sampled_accept(next_token_probs(logits, temperature, top_k, top_p), q_rows, drafted, generator)
        n_acc = len(new) - 1
        tokens += new
        t_cache.truncate(n + n_acc)  # keep the last emitted token and the accepted drafts
        d_cache.truncate(min(d_cache.position, n + n_acc))  # the draft never saw its own last draft
        stats.target_forwards += 1
        stats.rounds += 1
        stats.drafted += kk
        stats.accepted += n_acc
        stats.ks.append(kk)
        if adaptive and kk > 0:
            k_now = next_k(k_now, n_acc, kk, k_max)
    return Speculation(torch.tensor([tokens], device=prompt.device), stats)


def sample(target: GPT, draft: GPT, prompt: torch.Tensor, max_new_tokens: int, k: int, *, temperature: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampled speculative tokens (1, T + max_new_tokens): ``speculative_generate``'s tokens only."""
    return speculative_generate(target, draft, prompt, max_new_tokens, k, temperature=temperature,
                                generator=generator).tokens


def _models(target_config: dict, target_state: dict, draft_config: dict, draft_state: dict) -> tuple[GPT, GPT]:
    return GPT.from_state(target_config, target_state), GPT.from_state(draft_config, draft_state)


def greedy(target_config: dict, target_state: dict, draft_config: dict, draft_state: dict,
           prompt: torch.Tensor, max_new_tokens: int, k: int) -> torch.Tensor:
    """The check's contract: greedy speculative tokens (1, T + max_new_tokens) with fixed ``k``."""
    target, draft = _models(target_config, target_state, draft_config, draft_state)
    return speculative_generate(target, draft, prompt, max_new_tokens, k).tokens


def greedy_adaptive(target_config: dict, target_state: dict, draft_config: dict, draft_state: dict,
                    prompt: torch.Tensor, max_new_tokens: int, k: int) -> torch.Tensor:
    """The check's contract with adaptive k starting at ``k`` (bounded by 8)."""
    target, draft = _models(target_config, target_state, draft_config, draft_state)
    return speculative_generate(target, draft, prompt, max_new_tokens, k, adaptive=True).tokens


def target_greedy(target_config: dict, target_state: dict, draft_config: dict, draft_state: dict,
                  prompt: torch.Tensor, max_new_tokens: int, k: int) -> torch.Tensor:
    """The check's contract for the baseline: target-only cached greedy decoding (no draft)."""
    return generate(GPT.from_state(target_config, target_state), prompt, max_new_tokens)
