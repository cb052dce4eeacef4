"""Mutants of project 8's cached generation."""

import torch

from impl.gpt.model import GPT
from impl.kv_cache import concat, fast


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
