"""Mutants of project 8's cached generation."""

import torch

from impl.gpt.model import GPT
from impl.gpt.sampling import next_token_probs
from impl.kv_cache import blocked, concat, fast
from tests.mutants.gpt import LostOffsetGPT


class _OffByOneCache(fast.KVCache):
    def advance(self, n_tokens: int) -> None:
        self.position += n_tokens - 1 if n_tokens > 1 else n_tokens  # prefill forgets one position


class _StaleCache(fast.KVCache):
    def update(self, layer, k, v):
        super().update(layer, k, v)
        return k, v  # attends to the new token only: the cache is written but never read


def _generate_with(cache_cls, config, state, prompt, max_new_tokens):
    model = GPT.from_state(config, state)
    original = fast.KVCache
    fast.KVCache = cache_cls
    try:
        return fast.generate(model, prompt, max_new_tokens)
    finally:
        fast.KVCache = original


def off_by_one_position(config, state, prompt, max_new_tokens):
    return _generate_with(_OffByOneCache, config, state, prompt, max_new_tokens)


def stale_cache(config, state, prompt, max_new_tokens):
    return _generate_with(_StaleCache, config, state, prompt, max_new_tokens)


@torch.no_grad()
def drops_last_token(config, state, prompt, max_new_tokens):
    out = fast.greedy(config, state, prompt, max_new_tokens)
    return torch.cat([out[:, :-1], torch.zeros_like(out[:, -1:])], dim=1)


class _ConcatNotStored(concat.ConcatKVCache):
    def update(self, layer, k, v):
        if self.k[layer] is None:
            return super().update(layer, k, v)
        # the concatenation is attended to but never assigned back: each step sees the prompt
        # and itself only
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


def concat_result_not_stored(config, state, prompt, max_new_tokens):
    return fast.generate(GPT.from_state(config, state), prompt, max_new_tokens,
                         make_cache=_ConcatNotStored.for_model)


def _ragged_with(model_cls, config, state, prompts, max_new_tokens, pass_mask=True):
    idx, mask = fast.pad_prompts(prompts)
    model = model_cls.from_state(config, state)
    out = fast.decode(model, idx, max_new_tokens, attention_mask=mask if pass_mask else None)
    return out.new_tokens


def mask_sees_padding(config, state, prompts, max_new_tokens):
    """The batch is padded but no mask goes with it: every row attends to its padding tokens
    (and counts them as positions)."""
    return _ragged_with(GPT, config, state, prompts, max_new_tokens, pass_mask=False)


def position_offset_lost_on_one_row(config, state, prompts, max_new_tokens):
    """The most padded row's positions count slots (padding included) instead of its real tokens."""
    return _ragged_with(LostOffsetGPT, config, state, prompts, max_new_tokens)


class _StaleRollbackCache(concat.ConcatKVCache):
    def truncate(self, position):
        self.position = position  # the position moves back, the drafted keys/values stay in the tensors


def rollback_keeps_stale_entry(config, state, prompt, max_new_tokens):
    return fast.greedy_with_rejected_drafts(config, state, prompt, max_new_tokens,
                                            make_cache=_StaleRollbackCache.for_model)


def _step_without_rescale(m, denom, acc, s, v_blk):
    """Online softmax that forgets to rescale what it summed when a later block raises the maximum."""
    m_new = torch.maximum(m, s.amax(dim=-1))
    p = torch.exp(s - m_new.unsqueeze(-1))
    return m_new, denom + p.sum(dim=-1), acc + p @ v_blk  # bug: no exp(m - m_new) on what came before


def blocked_without_rescale(config, state, prompt, max_new_tokens):
    original = blocked.online_softmax_step
    blocked.online_softmax_step = _step_without_rescale
    try:
        return blocked.greedy(config, state, prompt, max_new_tokens)
    finally:
        blocked.online_softmax_step = original


def top_p_drops_crossing_token(logits, temperature, top_k, top_p):
    """Nucleus that stops BEFORE the token whose mass crosses p (keeps mass < p, not >= p)."""
    if top_p is None or top_p >= 1.0:
        return next_token_probs(logits, temperature, top_k, top_p)
    scaled = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(scaled, min(top_k, scaled.size(-1))).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return torch.softmax(scaled.masked_fill(drop, float("-inf")), dim=-1)


def top_k_off_by_one(logits, temperature, top_k, top_p):
    """Keeps k + 1 tokens."""
    return next_token_probs(logits, temperature, None if top_k is None else top_k + 1, top_p)
