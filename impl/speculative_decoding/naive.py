"""Speculative decoding as the papers' pseudocode: no cache, every forward re-reads the whole context.

Each round the draft proposes k tokens one at a time (running over the full context each time),
the target runs once over the context plus the k drafts, and the last k + 1 rows of its logits
decide what is kept (``verify``). ``fast.py`` is the same algorithm through KV caches.
"""

from __future__ import annotations

import torch

from impl.gpt.model import GPT
from impl.gpt.sampling import next_token_probs
from impl.speculative_decoding.verify import greedy_accept, sampled_accept


@torch.no_grad()
def speculative_generate(target: GPT, draft: GPT, prompt: torch.Tensor, max_new_tokens: int, k: int = 4, *,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Ids (1, T + max_new_tokens): ``prompt`` (1, T) continued by speculative decoding with ``k`` drafts
    per round (greedy at ``temperature == 0``, else speculative sampling from ``generator``)."""
    tokens = prompt
    end = prompt.shape[1] + max_new_tokens
    while tokens.shape[1] < end:
        kk = min(k, end - tokens.shape[1] - 1)
        context, draft_probs = tokens, []
        for _ in range(kk):  # draft: x_i ~ q_i(. | context, x_1 .. x_{i-1})
            q = next_token_probs(draft(context)[:, -1, :], temperature, top_k, top_p)  # (1, V)
            x = q.argmax(dim=-1, keepdim=True) if temperature == 0 else torch.multinomial(q, 1, generator=generator)
            draft_probs.append(q[0])
            context = torch.cat([context, x], dim=1)
        drafts = context[0, tokens.shape[1]:]  # (kk,)
        logits = target(context)[0, -(kk + 1):]  # (kk + 1, V): p_1 .. p_kk and the bonus row
        if temperature == 0:
            new = greedy_accept(logits, drafts)
        else:
            q_rows = torch.stack(draft_probs) if draft_probs else logits[:0]
            new = sampled_accept(next_token_probs(logits, temperature, top_k, top_p), q_rows, drafts, generator)
        tokens = torch.cat([tokens, torch.tensor([new], device=tokens.device)], dim=1)
    return tokens


def greedy(target_config: dict, target_state: dict, draft_config: dict, draft_state: dict,
           prompt: torch.Tensor, max_new_tokens: int, k: int) -> torch.Tensor:
    """The check's contract: greedy speculative tokens (1, T + max_new_tokens), recomputing everything."""
    target, draft = GPT.from_state(target_config, target_state), GPT.from_state(draft_config, draft_state)
    return speculative_generate(target, draft, prompt, max_new_tokens, k)
