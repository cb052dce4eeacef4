"""Unit tests of project 15 beyond the spec's checks: the quantized caches wired into P8's ``decode``,
ragged (padded) batches through the integer-domain attention, int4 packing, and the budget filler."""

from __future__ import annotations

import pytest
import torch

from benchmarks.workloads.kv_quantization import _fill
from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache.fast import KVCache, decode, pad_prompts
from impl.kv_quantization import fast, naive


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=65, block_size=96, n_layer=2, n_head=2, n_embd=32)).eval()


def test_a_cache_whose_group_never_fills_decodes_the_fp32_caches_tokens_exactly():
    model, prompt = _model(), torch.randint(65, (2, 5), generator=torch.Generator().manual_seed(1))
    want = decode(model, prompt, 40).tokens
    got = decode(model, prompt, 40, make_cache=naive.QuantizedKVCache.factory(8, group_size=64)).tokens
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_attention_decodes_like_dequantize_then_attend(bits):
    model, prompt = _model(), torch.randint(65, (2, 7), generator=torch.Generator().manual_seed(2))
    outs = [decode(model, prompt, 30, make_cache=cls.factory(bits, 8), return_probs=True)
            for cls in (naive.QuantizedKVCache, fast.QuantizedKVCache)]
    assert torch.allclose(outs[0].probs, outs[1].probs, atol=1e-5)


def test_int8_cache_greedy_tokens_mostly_agree_with_fp32():
    model, prompt = _model(), torch.randint(65, (4, 8), generator=torch.Generator().manual_seed(3))
    want = decode(model, prompt, 40, make_cache=KVCache.for_model).new_tokens
    got = decode(model, prompt, 40, make_cache=fast.QuantizedKVCache.factory(8, 8)).new_tokens
    assert (got == want).float().mean() > 0.8


def test_ragged_batch_through_the_integer_attention_matches_the_dequantizing_cache():
    model = _model()
    prompts = [torch.randint(65, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 11, 20)]
    idx, mask = pad_prompts(prompts)
    outs = [decode(model, idx, 25, attention_mask=mask, make_cache=cls.factory(8, 4), return_probs=True)
            for cls in (naive.QuantizedKVCache, fast.QuantizedKVCache)]
    assert torch.allclose(outs[0].probs, outs[1].probs, atol=1e-5)


def test_int4_codes_are_packed_two_per_byte():
    k = v = torch.randn(1, 2, 40, 8)
    cache = fast.QuantizedKVCache(1, bits=4, group_size=16)
    cache.append(0, k, v)
    st = cache.layers[0]
    assert st.k_codes.shape == (1, 2, 2, 8, 8) and st.k_codes.dtype == torch.uint8  # 16 tokens -> 8 bytes
    assert st.v_codes.shape == (1, 2, 32, 4)  # 8 channels -> 4 bytes
    assert st.k_res.shape[2] == 8


def test_a_full_cache_refuses_more_tokens():
    cache = fast.QuantizedKVCache(1, 8, 4, max_tokens=5)
    cache.append(0, torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4))
    cache.advance(5)
    with pytest.raises(ValueError, match="full"):
        cache.append(0, torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))


def test_budget_filler_stops_before_the_budget_is_exceeded():
    budget = 20_000
    cache = fast.QuantizedKVCache(2, 8, 8)
    held = _fill(cache, budget, 2, 2, 8, torch.float32, 1000)
    again = fast.QuantizedKVCache(2, 8, 8)
    for _ in range(held):
        for layer in range(2):
            again.append(layer, torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert again.nbytes <= budget < cache.nbytes
