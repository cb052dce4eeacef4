"""Unit tests of project 11 beyond the spec's checks: the accept rules on hand-made rows, the draft
cache's rollback (a self-draft accepts everything), adaptive k's bounds, the Medusa heads' start,
and the draft model's tokenizer being bpe-base's."""

from __future__ import annotations

import pytest
import torch

from impl import model_cache
from impl.gpt.model import GPT
from impl.speculative_decoding import fast, medusa
from impl.speculative_decoding.verify import greedy_accept, sampled_accept
from impl.train.checkpoint import read_meta
from impl.zoo import RECIPES
from tests.cases.gpt import random_gpt


def _one_hot_rows(ids: list[int], vocab: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()


def test_greedy_accept_keeps_the_matching_prefix_then_the_targets_token():
    logits = _one_hot_rows([3, 1, 4, 5])  # the target's argmax at each of k + 1 = 4 rows
    assert greedy_accept(logits, torch.tensor([3, 1, 2])) == [3, 1, 4]  # third draft wrong: corrected
    assert greedy_accept(logits, torch.tensor([0, 1, 4])) == [3]  # first draft wrong: nothing kept
    assert greedy_accept(logits, torch.tensor([3, 1, 4])) == [3, 1, 4, 5]  # all kept: plus the bonus row's


def test_greedy_accept_with_no_drafts_is_one_target_step():
    assert greedy_accept(_one_hot_rows([2]), torch.tensor([], dtype=torch.long)) == [2]


def test_sampled_accept_always_keeps_a_draft_the_target_likes_at_least_as_much():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.5, 0.4, 0.1]])  # p(1) = 0.6 >= q(1) = 0.4: min(1, p/q) = 1
    gen = torch.Generator().manual_seed(0)
    assert all(sampled_accept(p, q, torch.tensor([1]), gen)[0] == 1 for _ in range(200))


def test_sampled_accept_never_draws_a_token_the_residual_excludes():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.5, 0.5]])  # after rejecting id 2 (p = 0) the residual is max(0, p - q) = id 0 only
    gen = torch.Generator().manual_seed(0)
    assert all(sampled_accept(p, q, torch.tensor([2]), gen) == [0] for _ in range(100))


def test_drafting_with_the_target_itself_accepts_every_draft():
    """A draft identical to the target is always right: any stale entry in the draft's cache after a
    rollback would make it disagree, and the acceptance rate would fall below 1."""
    config, state = random_gpt(3, 2, 2, 8, 40, block_size=60, peaked=True)
    model = GPT.from_state(config, state)
    out = fast.speculative_generate(model, model, torch.tensor([[1, 2, 3]]), 50, k=4, adaptive=True)
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.target_forwards < 50 / 4  # k grows to k_max: far fewer target forwards than tokens
    assert out.tokens.shape == (1, 53)


@pytest.mark.parametrize(("k", "accepted", "drafted", "expected"),
                         [(4, 4, 4, 5), (8, 8, 8, 8), (4, 1, 4, 3), (1, 0, 1, 1), (4, 2, 4, 4)])
def test_adaptive_k_grows_after_full_acceptance_and_shrinks_after_poor_rounds_within_bounds(
        k, accepted, drafted, expected):
    assert fast.next_k(k, accepted, drafted, k_max=8) == expected


def test_sampling_is_reproducible_from_the_generator_seed():
    config, state = random_gpt(5, 1, 2, 8, 30, block_size=40)
    model = GPT.from_state(config, state)
    draft = GPT.from_state(*random_gpt(6, 1, 2, 8, 30, block_size=40))
    runs = [fast.sample(model, draft, torch.tensor([[4, 5]]), 20, 3, temperature=0.9,
                        generator=torch.Generator().manual_seed(11)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_a_draft_with_another_vocabulary_is_refused():
    target = GPT.from_state(*random_gpt(0, 1, 2, 8, 30, block_size=20))
    draft = GPT.from_state(*random_gpt(0, 1, 2, 8, 31, block_size=20))
    with pytest.raises(ValueError, match="share one tokenizer"):
        fast.speculative_generate(target, draft, torch.tensor([[1]]), 5)


def test_untrained_medusa_heads_predict_what_the_target_head_predicts():
    config, state = random_gpt(1, 2, 2, 8, 30, block_size=20)
    target = GPT.from_state(config, state)
    heads = medusa.MedusaHeads(target.config.n_embd, 3)
    hidden = torch.randn(5, target.config.n_embd)
    out = heads(hidden, target)  # (5, 3, V)
    assert out.shape == (5, 3, 30)
    assert torch.allclose(out, target.head(hidden).unsqueeze(1).expand_as(out))


def test_the_draft_recipe_learns_bpe_bases_tokenizer_on_bpe_bases_corpus():
    draft, base = RECIPES["bpe-draft"], RECIPES["bpe-base"]
    assert (draft.tokenizer, draft.corpus, draft.val_fraction) == (base.tokenizer, base.corpus, base.val_fraction)
    assert draft.model.vocab_size == base.model.vocab_size and draft.model.block_size >= base.model.block_size


def test_the_built_draft_model_has_bpe_bases_exact_merges_and_ids():
    files = [model_cache.entry_dir(n) / model_cache.MODEL_FILE for n in ("bpe-draft", "bpe-base")]
    if not all(f.is_file() for f in files):
        pytest.skip("bpe-draft or bpe-base is not built in this model cache")
    draft, base = (read_meta(f)["tokenizer"] for f in files)
    assert draft["merges"] == base["merges"]
    assert draft["special_tokens"] == base["special_tokens"] and draft["pattern"] == base["pattern"]
