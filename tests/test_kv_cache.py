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


# --- the generation API (``fast.decode``) and the cache operations the engine builds on ---

from impl.kv_cache import blocked  # noqa: E402
from impl.kv_cache.naive import generate as naive_generate  # noqa: E402


def test_decode_stops_a_row_at_its_stop_id_and_pads_after_it():
    model, prompt = _model(), torch.randint(65, (3, 4), generator=torch.Generator().manual_seed(2))
    free = fast.decode(model, prompt, 30).new_tokens
    stop = int(free[1, 5])  # row 1 produces it at step 5 (or earlier)
    out = fast.decode(model, prompt, 30, stop_ids=[stop], pad_id=64)
    for b in range(3):
        hits = (free[b] == stop).nonzero()
        if len(hits) == 0:
            assert not out.finished[b]
            continue
        end = int(hits[0]) + 1
        assert out.finished[b]
        assert torch.equal(out.new_tokens[b, :end], free[b, :end])  # identical up to and including the stop
        assert (out.new_tokens[b, end:] == 64).all()
        assert out.attention_mask[b, 4 + end:].sum() == 0 and out.attention_mask[b, : 4 + end].all()


def test_decode_ends_early_once_every_row_is_finished():
    model, prompt = _model(), torch.randint(65, (1, 4), generator=torch.Generator().manual_seed(3))
    first = int(fast.decode(model, prompt, 1).new_tokens[0, 0])
    out = fast.decode(model, prompt, 30, stop_ids=[first])
    assert out.tokens.shape == (1, 5) and bool(out.finished.all())


def test_decode_with_a_seeded_generator_is_reproducible_and_probs_are_what_it_draws_from():
    model, prompt = _model(), torch.randint(65, (2, 4), generator=torch.Generator().manual_seed(4))
    runs = [fast.decode(model, prompt, 15, temperature=0.9, top_k=30, top_p=0.9, return_probs=True,
                        generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    probs, new = runs[0].probs, runs[0].new_tokens
    assert probs.shape == (2, 15, 65)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 15))
    assert (probs.gather(-1, new.unsqueeze(-1)) > 0).all()  # every drawn token had mass
    assert ((probs > 0).sum(-1) <= 30).all()  # top-k held
    # without return_probs the same generator draws the same tokens
    plain = fast.decode(model, prompt, 15, temperature=0.9, top_k=30, top_p=0.9,
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(plain.tokens, runs[0].tokens)


def test_greedy_probs_put_all_mass_on_the_chosen_token():
    model, prompt = _model(), torch.randint(65, (2, 4))
    out = fast.decode(model, prompt, 6, return_probs=True)
    assert torch.equal(out.probs.argmax(-1), out.new_tokens) and torch.equal(out.probs.amax(-1), torch.ones(2, 6))


@pytest.mark.parametrize("make_cache", [fast.KVCache.for_model, concat.ConcatKVCache.for_model,
                                        blocked.BlockedKVCache.for_model], ids=["preallocated", "concat", "blocked"])
def test_every_cache_rolls_back_to_never_having_drafted(make_cache):
    model = _model()
    prompt = torch.randint(65, (2, 5), generator=torch.Generator().manual_seed(5))
    config, state = model.config.to_dict(), model.state_dict()
    expected = fast.greedy(config, state, prompt, 40)
    assert torch.equal(fast.greedy_with_rejected_drafts(config, state, prompt, 40, make_cache=make_cache), expected)


@pytest.mark.parametrize("make_cache", [fast.KVCache.for_model, concat.ConcatKVCache.for_model,
                                        blocked.BlockedKVCache.for_model], ids=["preallocated", "concat", "blocked"])
def test_a_cache_refuses_to_truncate_past_what_it_holds(make_cache):
    model = _model()
    cache = make_cache(model, 1, 16)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(4)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(-1)


def test_ragged_rows_sample_like_each_row_alone_with_its_own_mask():
    """A left-padded batch through the blocked cache (cache-owned attention, per-row masks) gives
    each prompt's greedy tokens, as the recompute does alone."""
    model = _model()
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(65, (n,), generator=gen) for n in (1, 7, 3)]
    idx, mask = fast.pad_prompts(prompts)
    out = fast.decode(model, idx, 20, attention_mask=mask, make_cache=blocked.BlockedKVCache.for_model)
    for b, p in enumerate(prompts):
        assert torch.equal(out.new_tokens[b], naive_generate(model, p.reshape(1, -1), 20)[0, len(p):])


def test_pad_prompts_names_what_is_wrong():
    with pytest.raises(ValueError, match="no prompts"):
        fast.pad_prompts([])
    with pytest.raises(ValueError, match="at least one token"):
        fast.pad_prompts([[1, 2], []])
    ids, mask = fast.pad_prompts([[5], [1, 2, 3]], pad_id=9)
    assert ids.tolist() == [[9, 9, 5], [1, 2, 3]] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]


def test_a_mask_of_the_wrong_length_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
