"""Project 15 on the paged cache: ``QuantizedPagedKVCache`` holds what the contiguous KIVI cache holds (block_size
as G) for ragged chunked writes, decodes like it through the engine, counts its bytes exactly, and keeps P13's
books through copy-on-write, fork, truncate and free. A mutant quantizing keys per token must be caught."""

from __future__ import annotations

import functools

import pytest
import torch

from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.gpt.model import GPT
from impl.kv_cache.fast import decode
from impl.kv_quantization import naive
from impl.kv_quantization.paged import QuantizedPagedKVCache
from impl.paged_attention.fast import PagedKVCache
from impl.ptq.quant import dequantize
from tests.cases.paged_attention import bookkeeping_holds, check_invariants, greedy_case


def _streams(seed: int, lengths: list[int], n_head: int, head_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values (nh, N, hs) per sequence; channel 1 of the keys is an outlier channel (KIVI's case)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        k = torch.randn(n_head, n, head_dim, generator=gen)
        k[:, :, 1] *= 20.0
        out.append((k, torch.randn(n_head, n, head_dim, generator=gen)))
    return out


def _feed(cache: PagedKVCache, streams, chunkings: list[list[int]], first_id: int = 0) -> None:
    """Write every sequence's stream into layer 0 of ``cache`` in its own chunks, the sequences side by side in
    shared right-padded forwards (padding columns hold random keys/values that must never be stored)."""
    ids = list(range(first_id, first_id + len(streams)))
    for s in ids:
        if s not in cache.sequences():
            cache.add_sequence(s)
    done = [0] * len(streams)
    gen = torch.Generator().manual_seed(99)
    for step in range(max(len(c) for c in chunkings)):
        rows = [i for i, c in enumerate(chunkings) if step < len(c)]
        n_new = [chunkings[i][step] for i in rows]
        T = max(n_new)
        nh, _, hs = streams[0][0].shape
        q, k, v = (torch.randn(len(rows), nh, T, hs, generator=gen) * 50 for _ in range(3))
        for b, (i, n) in enumerate(zip(rows, n_new, strict=True)):
            k[b, :, :n] = streams[i][0][:, done[i]:done[i] + n]
            v[b, :, :n] = streams[i][1][:, done[i]:done[i] + n]
            cache.reserve(ids[i], n)
            done[i] += n
        cache.set_batch([ids[i] for i in rows], n_new)
        cache.attend(0, q, k, v, None, None)
        cache.advance(T)


def _contiguous(keys: torch.Tensor, values: torch.Tensor, chunks: list[int], bits: int, bs: int):
    """The contiguous KIVI cache's keys and values (nh, N, hs) for one stream with G = bs. Its last, partial group
    keeps values in full precision where the paged cache has already rounded them per token, so its values come
    from the same stream padded to a whole group (a value's grid is its own token's: the padding changes none)."""
    k, _ = naive.dequantized_stream(keys[None], values[None], chunks, bits, bs)
    pad = -keys.shape[1] % bs
    zeros = torch.zeros(values.shape[0], pad, values.shape[2])
    _, v = naive.dequantized_stream(torch.cat([keys, zeros], 1)[None], torch.cat([values, zeros], 1)[None],
                                    [*chunks, pad] if pad else chunks, bits, bs)
    return k[0], v[0, :, :keys.shape[1]]


def _assert_matches_contiguous(cache: QuantizedPagedKVCache, seq_id: int, keys, values, chunks, bits: int) -> None:
    got_k, got_v = cache.dequantized(seq_id, 0)
    want_k, want_v = _contiguous(keys, values, chunks, bits, cache.block_size)
    assert torch.equal(got_k, want_k), f"keys differ by up to {(got_k - want_k).abs().max():.3g}"
    assert torch.equal(got_v, want_v), f"values differ by up to {(got_v - want_v).abs().max():.3g}"


RAGGED = [  # (lengths, chunkings, block_size): chunks cross, end on and stop short of block edges
    ([13, 8, 1], [[5, 1, 3, 4], [8], [1]], 4),
    ([20, 9], [[1] * 7 + [13], [2, 2, 2, 3]], 6),
    ([33, 16, 7], [[16, 17], [3, 13], [7]], 8),
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("lengths, chunkings, bs", RAGGED)
def test_dequantized_paged_cache_equals_the_contiguous_kivi_cache_for_ragged_chunked_writes(bits, lengths,
                                                                                           chunkings, bs):
    streams = _streams(len(lengths) + bs, lengths, 2, 8)
    cache = QuantizedPagedKVCache(1, 2, 8, 24, bs, bits=bits)
    _feed(cache, streams, chunkings)
    for s, ((k, v), chunks) in enumerate(zip(streams, chunkings, strict=True)):
        _assert_matches_contiguous(cache, s, k, v, chunks, bits)


class _KeysPerToken(QuantizedPagedKVCache):
    """Mutant: a key block quantized with one grid per token (the values' axis), where KIVI means per channel.
    Stored in the same pools when block_size == head_dim."""

    def _quantize_key_blocks(self, k):
        q, scale, zero = self.quantizer.quantize_values(k)  # (C, nh, bs, hs), (C, nh, bs)
        return self._pack(q.transpose(-1, -2)), scale, zero

    def _keys(self, codes, scale, zero):
        q = self.quantizer.codes(codes, self.block_size).transpose(-1, -2)  # (..., bs, hs)
        return dequantize(q, scale[..., None], zero[..., None].float(), self.quantizer.scheme, self.dtype)


def test_the_contiguous_comparison_rejects_keys_quantized_per_token():
    lengths, chunkings = [19, 8], [[3, 9, 7], [8]]
    streams = _streams(5, lengths, 2, 8)
    cache = _KeysPerToken(1, 2, 8, 12, 8)
    _feed(cache, streams, chunkings)
    with pytest.raises(AssertionError, match="keys differ"):
        _assert_matches_contiguous(cache, 0, *streams[0], chunkings[0], 8)


def _model(case) -> GPT:
    return GPT.from_state(case["config"], case["state"]).eval()


class _ValuesRoundedOnArrival(naive.QuantizedKVCache):
    """The contiguous KIVI cache with the paged cache's one difference: the values of its residual (the partial
    group) are read rounded to their per-token grid, which is final on arrival; keys stay full precision."""

    def dequantized(self, layer):
        k, v = super().dequantized(layer)
        n = self.quantized_tokens(layer)
        if n == v.shape[2]:
            return k, v
        q, scale, zero = self.quantize_values(v[:, :, n:])
        rounded = dequantize(q, scale[..., None], zero[..., None].float(), self.scheme, v.dtype)
        return k, torch.cat([v[:, :, :n], rounded], dim=2)


def _engine_tokens(case, bits: int) -> list[list[int]]:
    """Greedy new tokens of the case's prompts served together by the engine on a QuantizedPagedKVCache."""
    model, bs = _model(case), case["block_size"]
    engine = Engine(model, max_num_seqs=4, block_size=bs, num_blocks=40, kv_bits=bits)
    assert isinstance(engine.cache, QuantizedPagedKVCache) and engine.cache.bits == bits
    outs = engine.generate([p.tolist() for p in case["prompts"]], SamplingParams(max_tokens=case["max_new_tokens"]))
    check_invariants(engine.cache)
    assert engine.cache.k_stage.shape[1] == 0 and engine.cache.allocator.num_free == 40  # all handed back
    return [out.token_ids for out in outs]


def _contiguous_tokens(case, cache_cls, bits: int) -> list[list[int]]:
    """Greedy new tokens of each prompt decoded alone through a contiguous KIVI cache (G = block_size)."""
    model, n, bs = _model(case), case["max_new_tokens"], case["block_size"]
    return [decode(model, p[None], n, make_cache=cache_cls.factory(bits, bs)).tokens[0, len(p):].tolist()
            for p in case["prompts"]]


GREEDY = [greedy_case(1, [9, 1, 4, 13], 16, 4, id="four-rows-block-4"),
          greedy_case(4, [16, 5, 11], 16, 8, head_dim=16, id="three-rows-block-8")]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", GREEDY, ids=lambda c: c["id"])
def test_engine_on_the_quantized_paged_cache_decodes_the_contiguous_kivi_caches_tokens_exactly(bits, case):
    assert _engine_tokens(case, bits) == _contiguous_tokens(case, _ValuesRoundedOnArrival, bits)


def test_engine_int8_tokens_mostly_agree_with_the_plain_contiguous_kivi_cache():
    case = GREEDY[1]
    got, want = _engine_tokens(case, 8), _contiguous_tokens(case, naive.QuantizedKVCache, 8)
    agree = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert agree / sum(map(len, want)) >= 0.9


def test_prefix_caching_shares_quantized_blocks_and_keeps_the_tokens():
    case = GREEDY[1]
    model, base = _model(case), case["prompts"][0].tolist()
    prompts = [base + [3, 5], base + [7], base[:10] + [1, 2, 3]]  # run one at a time: later ones hit the cache
    runs = []
    for prefix_caching in (False, True):
        engine = Engine(model, max_num_seqs=1, block_size=4, num_blocks=40, prefix_caching=prefix_caching,
                        kv_bits=8)
        outs = engine.generate(prompts, SamplingParams(max_tokens=8))
        runs.append(([o.token_ids for o in outs], [o.metrics.cached_prompt_tokens for o in outs]))
    assert runs[1][1] == [0, 16, 8]  # whole blocks of the shared prompt came from the cache
    assert runs[1][0] == runs[0][0]


def _bytes_formula(n_layer, n_head, head_dim, num_blocks, bs, bits, live) -> int:
    codes = n_head * bs * head_dim * bits // 8  # per block and layer, keys and values alike
    key_params = n_head * head_dim * (4 + 1)  # fp32 scale + uint8 zero per (head, channel)
    value_params = n_head * bs * (4 + 1)  # per (head, slot)
    staging = live * n_head * bs * head_dim * 4  # fp32 keys of each live sequence's last block
    return n_layer * (num_blocks * (2 * codes + key_params + value_params) + staging)


@pytest.mark.parametrize("bits", [8, 4])
def test_nbytes_is_the_formula_with_scales_zero_points_and_staging_exactly(bits):
    cache = QuantizedPagedKVCache(3, 2, 8, 10, 4, bits=bits)
    assert cache.nbytes == _bytes_formula(3, 2, 8, 10, 4, bits, live=0)
    _feed(cache, _streams(0, [6, 3], 2, 8), [[6], [3]])
    cache.fork(0, 7)
    assert cache.nbytes == _bytes_formula(3, 2, 8, 10, 4, bits, live=3)
    cache.free_sequence(1)
    assert cache.nbytes == _bytes_formula(3, 2, 8, 10, 4, bits, live=2)
    fp32 = PagedKVCache(3, 2, 8, 10, 4).nbytes
    assert cache.nbytes - _bytes_formula(3, 2, 8, 10, 4, bits, live=2) + fp32 == fp32  # same units as P13's


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed, n_ops, bs, num_blocks", [(0, 80, 4, 16), (1, 150, 2, 30), (2, 150, 8, 6)])
def test_random_add_reserve_write_truncate_fork_free_keep_the_books(bits, seed, n_ops, bs, num_blocks):
    bookkeeping_holds(functools.partial(QuantizedPagedKVCache, bits=bits), seed, n_ops, bs, num_blocks)


def test_a_fork_writes_into_its_own_copy_and_the_parent_keeps_its_keys_and_values():
    (k, v), = _streams(3, [14], 2, 8)
    cache = QuantizedPagedKVCache(1, 2, 8, 12, 4)
    _feed(cache, [(k[:, :10], v[:, :10])], [[6, 4]])  # 10 tokens: block 2 half full, its keys in staging
    cache.fork(0, 1)
    shared = cache.block_table(0)[2]
    _feed(cache, [(k[:, 10:], v[:, 10:])], [[4]], first_id=1)  # the child fills the shared block: copy-on-write
    assert cache.block_table(1)[2] != shared and cache.block_table(0)[2] == shared
    _assert_matches_contiguous(cache, 0, k[:, :10], v[:, :10], [6, 4], 8)
    _assert_matches_contiguous(cache, 1, k, v, [6, 4, 4], 8)
    check_invariants(cache)


def test_truncating_into_a_quantized_block_moves_its_rounded_keys_back_to_staging():
    (k, v), = _streams(4, [12], 2, 8)
    cache = QuantizedPagedKVCache(1, 2, 8, 8, 4)
    _feed(cache, [(k, v)], [[12]])
    before_k, before_v = cache.dequantized(0, 0)
    cache.truncate(0, 6)  # into block 1, which was full and quantized
    after_k, after_v = cache.dequantized(0, 0)
    assert torch.equal(after_k, before_k[:, :6]) and torch.equal(after_v, before_v[:, :6])
    assert torch.equal(cache.k_stage[0, 0][:, :2], before_k[:, 4:6])  # staging holds the dequantized keys
    _feed(cache, [(k[:, 6:8], v[:, 6:8])], [[2]])  # block 1 refills: quantized again from rounded and new keys
    got_k, got_v = cache.dequantized(0, 0)
    rounded = torch.cat([after_k, k[:, 6:8]], dim=1)
    want_k, want_v = _contiguous(rounded, v[:, :8], [8], 8, 4)
    assert torch.equal(got_k[:, :4], before_k[:, :4])  # block 0 untouched
    assert torch.equal(got_k[:, 4:], want_k[:, 4:]) and torch.equal(got_v, want_v)


def test_a_partly_filled_prefix_block_cannot_be_shared_except_by_fork():
    cache = QuantizedPagedKVCache(1, 1, 2, 4, 4)
    block = cache.allocator.allocate()
    with pytest.raises(ValueError, match="partly filled prefix block"):
        cache.add_sequence(0, [block], cached_tokens=3)


def test_the_quantized_cache_holds_under_a_third_of_the_fp32_paged_caches_bytes_per_token():
    q8 = QuantizedPagedKVCache(6, 4, 64, 64, 16)
    fp32 = PagedKVCache(6, 4, 64, 64, 16)
    assert q8.nbytes / fp32.nbytes < 1 / 3  # 153 / 512 bytes per token and head: codes 128 + scales 25
