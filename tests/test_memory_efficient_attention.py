"""Unit tests of project 22 beyond its spec checks: decoding through the GPT with the split-K
backend and a real KV cache, any query chunk, the pieces themselves, the errors users see, and
that the Triton kernels compile for a GPU.

The spec checks (tests/test_specs.py, ``-k memory_efficient``) pin chunked, split-K and the
Triton kernels to the textbook for any number of pieces, and the LSE merge to the unsplit result.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import impl.memory_efficient_attention  # registers the "split_k" backend
from impl.gpt.attention import naive_attention
from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache.fast import KVCache
from impl.memory_efficient_attention import fast
from impl.memory_efficient_attention.naive import attention_with_lse
from tests.cases.flash_attention import attention_case
from tests.test_flash_attention import compile_for_h100


def test_split_k_backend_decodes_token_by_token_like_a_full_sdpa_pass(monkeypatch):
    # pieces of 4 keys (the defaults, 512 and 1024, would leave these short sequences unsplit)
    monkeypatch.setattr(impl.memory_efficient_attention, "DECODE_KEYS_PER_SPLIT", 4)
    monkeypatch.setattr(impl.memory_efficient_attention, "PREFILL_KEYS_PER_CHUNK", 4)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32)
    ref = GPT(config).eval()
    model = GPT(GPTConfig(**{**config.to_dict(), "attention": "split_k"})).eval()
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(1))
    cache = KVCache.for_model(model, batch=2, max_tokens=64)  # cached K, V are strided views
    with torch.no_grad():
        steps = [model(idx[:, :10], cache)]  # prefill: chunked attention
        steps += [model(idx[:, t : t + 1], cache) for t in range(10, 30)]  # decode: split-K, T = 1
        torch.testing.assert_close(torch.cat(steps, dim=1), ref(idx), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 40), extra=st.integers(0, 30), query_chunk=st.integers(1, 45), splits=st.integers(1, 12)
)
def test_chunked_attention_is_exact_for_any_query_chunk(T, extra, query_chunk, splits):
    case = attention_case(2, 1, T, T + extra, 16, True, seed=T * 7 + extra)
    q, k, v = (case[n].double() for n in ("q", "k", "v"))
    o, lse = fast.chunked_attention_with_lse(q, k, v, True, num_splits=splits, query_chunk=query_chunk)
    o_ref, lse_ref = attention_with_lse(q, k, v, True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)


@given(length=st.integers(0, 200), num_splits=st.integers(1, 250))
def test_split_bounds_tile_the_range_in_near_equal_pieces(length, num_splits):
    bounds = fast.split_bounds(length, num_splits)
    assert len(bounds) == num_splits
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous, no overlap
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_chunked_attention_backpropagates_like_the_textbook():
    case = attention_case(1, 2, 37, 50, 16, True, seed=6, grad=True)
    leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v")]
    grads = torch.autograd.grad(fast.chunked_attention(*leaves, True, 3, 8), leaves, case["dy"])
    ref_leaves = [case[n].clone().requires_grad_() for n in ("q", "k", "v")]
    ref = torch.autograd.grad(naive_attention(*ref_leaves, True), ref_leaves, case["dy"])
    for g, g_ref in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_triton_split_k_reads_a_strided_cache_without_copying_it():
    from impl.memory_efficient_attention.triton import split_k_attention as triton_split_k

    case = attention_case(1, 2, 1, 45, 40, True, seed=7)
    buffer_k, buffer_v = torch.zeros(1, 2, 64, 40), torch.zeros(1, 2, 64, 40)  # room for 64 tokens
    buffer_k[:, :, :45], buffer_v[:, :, :45] = case["k"], case["v"]
    k, v = buffer_k[:, :, :45], buffer_v[:, :, :45]  # what a pre-allocated KV cache hands over
    assert not k.is_contiguous()
    y = triton_split_k(case["q"], k, v, True, 4)
    torch.testing.assert_close(y, naive_attention(case["q"], k, v, True))


@pytest.mark.parametrize("name", ["fast", "triton"])
def test_zero_splits_is_an_error(name):
    from impl.memory_efficient_attention import triton as split_k_triton

    fn = {"fast": fast.split_k_attention, "triton": split_k_triton.split_k_attention}[name]
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(ValueError, match="num_splits must be at least 1"):
        fn(q, q, q, True, 0)


def test_split_k_kernels_compile_for_an_h100():
    module = "impl.memory_efficient_attention.triton"
    strides = {f"stride_{t}{d}": "i64" for t in "kv" for d in "bhs"}
    jobs = []
    for dtype in ("bf16", "fp32"):
        p = f"*{dtype}"
        partials = {"Q": p, "K": p, "V": p, "O_PART": "*fp32", "LSE_PART": "*fp32", "T": "i32", "S": "i32",
                    "n_heads": "i32", **strides, "chunk": "i32", "kv_offset": "i32", "qk_scale": "fp32"}
        jobs += [
            (module, "_split_k_partials_kernel", partials,
             {"CAUSAL": True, "HEAD_DIM": 80, "BLOCK_N": 64, "BLOCK_D": 128}),
            (module, "_split_k_combine_kernel",
             {"O_PART": "*fp32", "LSE_PART": "*fp32", "Out": p, "n_splits": "i32"},
             {"HEAD_DIM": 80, "BLOCK_D": 128, "BLOCK_SPLITS": 128}),
        ]  # fmt: skip
    compile_for_h100(jobs)
