"""Mutants of project 11: broken accept rules and rollbacks the checks must reject."""

from __future__ import annotations

from unittest.mock import patch

import torch

from impl.kv_cache.fast import KVCache
from impl.speculative_decoding import fast

# ---------------------------------------------------------------- sampled accept (the distribution check)


def _sampled(target_probs, draft_probs, draft_tokens, generator, residual_of, bonus_row, always=False):
    k = draft_tokens.shape[0]
    drafts = draft_tokens.tolist()
    for i in range(k):
        x = drafts[i]
        u = float(torch.rand(1, generator=generator))
        if always or u * float(draft_probs[i, x]) < float(target_probs[i, x]):
            continue
        residual = residual_of(target_probs[i], draft_probs[i])
        return drafts[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
    return drafts + [int(torch.multinomial(target_probs[bonus_row(k)], 1, generator=generator))]


def always_accept(target_probs, draft_probs, draft_tokens, generator=None):
    """Every draft is kept: the tokens follow the draft's law, not the target's."""
    return _sampled(target_probs, draft_probs, draft_tokens, generator, lambda p, q: (p - q).clamp(min=0),
                    lambda k: k, always=True)


def residual_without_subtracting_draft(target_probs, draft_probs, draft_tokens, generator=None):
    """After a rejection, draw from p instead of norm(max(0, p - q)): the accepted mass is counted twice."""
    return _sampled(target_probs, draft_probs, draft_tokens, generator, lambda p, q: p, lambda k: k)


def bonus_from_previous_row(target_probs, draft_probs, draft_tokens, generator=None):
    """When every draft is kept, the bonus token is drawn from p_{k-1} instead of p_k (off by one)."""
    return _sampled(target_probs, draft_probs, draft_tokens, generator, lambda p, q: (p - q).clamp(min=0),
                    lambda k: k - 1)


# ---------------------------------------------------------------- greedy generation (the exact check)


def _greedy_with(name, value, case):
    with patch.object(fast, name, value):
        return fast.greedy(**case)


def _accept_all_greedy(target_logits, draft_tokens):
    return draft_tokens.tolist() + [int(target_logits[-1].argmax())]


def always_accept_greedy(target_config, target_state, draft_config, draft_state, prompt, max_new_tokens, k):
    """Greedy verification that keeps every draft."""
    return _greedy_with("greedy_accept", _accept_all_greedy, locals())


def _bonus_previous_row_greedy(target_logits, draft_tokens):
    best = target_logits.argmax(dim=-1).tolist()
    drafts = draft_tokens.tolist()
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return drafts[:n] + [best[max(n - 1, 0) if n == len(drafts) else n]]


def bonus_from_previous_row_greedy(target_config, target_state, draft_config, draft_state, prompt,
                                   max_new_tokens, k):
    """After a fully accepted round, the bonus is the argmax of row k - 1 instead of row k."""
    return _greedy_with("greedy_accept", _bonus_previous_row_greedy, locals())


class _RollsBackTooFar(KVCache):
    def truncate(self, position):
        super().truncate(max(position - 1, 0))  # forgets the last kept token too


def rollback_one_too_far(target_config, target_state, draft_config, draft_state, prompt, max_new_tokens, k):
    """Both caches roll back one slot past the kept length: the next round's keys sit one position early."""
    return _greedy_with("KVCache", _RollsBackTooFar, locals())


# ---------------------------------------------------------------- sampled generation end to end


def _accept_all_sampled(target_probs, draft_probs, draft_tokens, generator=None):
    return always_accept(target_probs, draft_probs, draft_tokens, generator)


def sample_always_accepting(target, draft, prompt, max_new_tokens, k, *, temperature, generator=None):
    """Sampled generation whose verification keeps every draft: the draft model's law."""
    with patch.object(fast, "sampled_accept", _accept_all_sampled):
        return fast.sample(target, draft, prompt, max_new_tokens, k, temperature=temperature, generator=generator)
