"""Unit tests of project 8 beyond the spec's checks: the two caches' bookkeeping and the formula
the memory claim divides by."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads.kv_cache import formula_bytes, p1_config
from impl.gpt.model import GPT
from impl.kv_cache import concat, fast


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(p1_config(block_size=64)).eval()


@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (3, 17), (8, 64)])
def test_memory_claim_formula_is_the_preallocated_cache_size(batch, tokens):
    model = _model()
    assert formula_bytes(model.config, batch, tokens) == fast.KVCache.for_model(model, batch, tokens).nbytes


def test_concat_cache_holds_exactly_the_tokens_seen_so_far():
    model, prompt = _model(), torch.randint(65, (2, 5))
    cache = concat.ConcatKVCache.for_model(model, 2, 64)
    with torch.no_grad():
        model(prompt, cache=cache)
        model(prompt[:, :1], cache=cache)
    assert cache.position == 6
    assert all(t.shape == (2, 4, 6, 32) for t in cache.k + cache.v)
    assert cache.nbytes == formula_bytes(model.config, 2, 6)


def test_concat_generation_equals_the_preallocated_one_when_sampling():
    model, prompt = _model(), torch.randint(65, (2, 3))
    outs = [gen(model, prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(1))
            for gen in (fast.generate, concat.generate)]
    assert torch.equal(outs[0], outs[1])
