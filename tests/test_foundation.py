"""Unit tests of the shared pieces: corpora, tokens, checkpoints, sampling, the KV cache, CLIs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from impl.data.corpus import CorpusNotFound, load_text, split_text
from impl.data.tokens import CharTokenizer, random_batch
from impl.gpt.model import GPT, GPTConfig
from impl.gpt.sampling import sample_next
from impl.kv_cache.fast import KVCache
from impl.train.checkpoint import load_checkpoint, save_checkpoint


def test_default_corpus_is_the_complete_works():
    text = load_text("shakespeare")
    assert len(text) > 4_900_000 and "ROMEO" in text


def test_an_unknown_corpus_names_what_was_tried(tmp_path):
    with pytest.raises(CorpusNotFound, match="neither a known name"):
        load_text(str(tmp_path / "missing.txt"))


def test_tinyshakespeare_offline_error_lists_every_place_tried(monkeypatch, tmp_path):
    import impl.data.corpus as corpus

    monkeypatch.setenv("HANDSON_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "_tinyshakespeare_candidates", lambda: [tmp_path / "nope.txt"])
    monkeypatch.setattr(corpus, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens
    with pytest.raises(CorpusNotFound) as info:
        load_text("tinyshakespeare")
    assert "nope.txt" in str(info.value) and "127.0.0.1:9" in str(info.value)


def test_split_is_deterministic_and_complete():
    train, val = split_text("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abc", 1.5)


@given(st.text(min_size=1))
def test_char_tokenizer_round_trips_its_own_text(text):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_char_tokenizer_names_an_unknown_character():
    with pytest.raises(ValueError, match="'z' is not in"):
        CharTokenizer.from_text("abc").encode("abz")


def test_batches_are_shifted_by_one():
    data = np.arange(100, dtype=np.uint16)
    x, y = random_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and torch.equal(y, x + 1)


def test_checkpoint_round_trip_is_exact_and_leaves_no_temp_file(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=11))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(11, (1, 5))).sum().backward()
    opt.step()
    state = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, {"g": state}, {"iter": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    other = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=11))
    other_opt = torch.optim.AdamW(other.parameters())
    meta, rng = load_checkpoint(path, other, other_opt)
    assert meta == {"iter": 3} and torch.equal(rng["g"], state)
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other.lm_head.weight is other.wte.weight, "weight tying survives loading"
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16)))
    with pytest.raises(Exception, match="size mismatch|does not fit"):
        load_checkpoint(path, GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32)))


def test_top_k_sampling_only_draws_from_the_top_k():
    logits = torch.arange(10.0).repeat(2, 1)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 1.0, 3, gen) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {7, 8, 9}
    assert sample_next(logits, 0.0).flatten().tolist() == [9, 9]


def test_kv_cache_refuses_to_overflow():
    cache = KVCache(1, 1, 1, 4, max_tokens=3)
    cache.update(0, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    cache.advance(3)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_model_refuses_a_context_longer_than_its_positions():
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))(torch.zeros(1, 9, dtype=torch.long))


def test_unknown_attention_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="known backends: .*naive.*sdpa"):
        GPT(GPTConfig(attention="quantum"))


def test_char_gpt_trains_checkpoints_and_samples_from_the_cli(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question. " * 200)
    run = lambda *a: subprocess.run([sys.executable, "-m", "impl.char_gpt", *a], capture_output=True, text=True)
    out = run("train", "--corpus", str(corpus), "--out", str(tmp_path / "ck"), "--max-iters", "30",
              "--eval-interval", "10", "--eval-iters", "2", "--n-layer", "1", "--n-embd", "32", "--block-size", "16")
    assert out.returncode == 0, out.stderr
    assert "val loss" in out.stdout
    assert {p.name for p in (tmp_path / "ck").iterdir()} >= {"last.safetensors", "best.safetensors",
                                                              "metrics.jsonl", "tokenizer.json"}
    sample = run("sample", "--out", str(tmp_path / "ck"), "--prompt", "to be", "--chars", "40")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("to be") and len(sample.stdout) >= 45
    missing = run("sample", "--out", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "train first" in missing.stderr
