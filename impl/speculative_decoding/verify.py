"""Verifying drafted tokens against the target: pure functions, no model, no cache.

The target scores the last emitted token and the k drafts in ONE forward, giving k + 1 rows of
logits: row i is the target's distribution for the token at draft position i (row k: the token
after every draft, the "bonus"). These functions decide how many drafts to keep and which token
follows them; the caller rolls its caches back to the kept length. The batched engine calls them
per request on its own paged cache.

- ``greedy_accept``: keep drafts while each equals the target's argmax; then append the target's
  argmax at the first mismatch (or the bonus row's). The output is exactly target-only greedy.
- ``sampled_accept`` (Leviathan et al. 2023, Chen et al. 2023): keep draft x_i with probability
  min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw from the residual
  norm(max(0, p_i - q_i)); if all k are kept draw the bonus token from p_k. Every emitted token is
  then distributed exactly as the target's p, whatever the draft's q.
"""

from __future__ import annotations

import torch


def greedy_accept(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> list[int]:
    """Accepted drafts followed by the target's next token, as a list of ``n_accepted + 1`` ids.

    ``target_logits`` (k + 1, V): the target's logits at the last emitted token and at each draft;
    ``draft_tokens`` (k,). Only argmaxes are compared, so logits or probabilities both work."""
    k = draft_tokens.shape[0]
    best = target_logits.argmax(dim=-1).tolist()  # (k + 1,): one host sync for the whole round
    drafts = draft_tokens.tolist()
    n = 0
    while n < k and drafts[n] == best[n]:
        n += 1
    return drafts[:n] + [best[n]]  # best[n]: the correction at the first mismatch, or the bonus (n == k)


def sampled_accept(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                   generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling's accept / reject: ``n_accepted + 1`` ids whose law is the target's.

    ``target_probs`` (k + 1, V) and ``draft_probs`` (k, V): the distributions (``next_token_probs``
    with the request's temperature / top-k / top-p) the target and the draft assign at each draft
    position; ``draft_tokens`` (k,) were drawn from ``draft_probs``. Uniforms and the final draw
    come from ``generator``."""
    k = draft_tokens.shape[0]
    drafts = draft_tokens.tolist()
    idx = torch.arange(k, device=draft_tokens.device)
    p = target_probs[idx, draft_tokens].tolist()  # p_i(x_i), q_i(x_i): one gather each, one host sync
    q = draft_probs[idx, draft_tokens].tolist()
    u = torch.rand(k, generator=generator, device=target_probs.device).tolist() if k else []
    for i in range(k):
        if u[i] * q[i] < p[i]:  # u < p / q without dividing (q > 0: x_i was drawn from q)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0.0)  # max(0, p - q)
        if not residual.sum() > 0:  # p == q up to rounding: a rejection has probability ~0; p is the law
            residual = target_probs[i]
        return drafts[:i] + [int(torch.multinomial(residual, 1, generator=generator))]  # normalised by multinomial
    return drafts + [int(torch.multinomial(target_probs[k], 1, generator=generator))]  # the bonus token
