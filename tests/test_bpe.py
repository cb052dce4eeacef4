"""Unit tests of project 2 beyond the spec's checks: the Tokenizer API, the file format, the
CLI, the training pipeline and its WikiText fallback."""

from __future__ import annotations

import json

import pytest
import tiktoken_ext.openai_public as openai_public

from impl.bpe import GPT2_SPLIT_PATTERN, Tokenizer, fast, load, naive, train
from impl.bpe.__main__ import main
from impl.bpe.pipeline import default_path, default_tokenizer_path, training_text
from impl.bpe.regex_split import split_chunks
from impl.data import wikitext
from reference import tiktoken_bpe

EOT = "<|endoftext|>"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer 😀 中文\n" * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train(TEXT, 256 + 40 + 2, special_tokens=[EOT, "<|pad|>"])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDSON_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    return corpus


def test_textbook_example_encodes_to_the_known_ids():
    merges = fast.train_merges("aaabdaaabac", 259)
    assert fast.encode_ids("aaabdaaabac", merges) == naive.encode_ids("aaabdaaabac", merges) == [258, 100, 258, 97, 99]


def test_gpt2_pattern_is_tiktokens_r50k_pattern():
    assert GPT2_SPLIT_PATTERN == openai_public.r50k_pat_str


def test_split_chunks_cover_the_text_exactly():
    text = "Hello world's 123456 \n\n  ok!!\t\r\n 你好 😀 e\u0301  "
    assert "".join(split_chunks(text, "gpt4")) == text
    assert split_chunks("123456", "gpt4") == ["123", "456"]


def test_vocab_size_counts_bytes_merges_and_special_tokens(tok):
    assert tok.vocab_size == 256 + 40 + 2 == 256 + len(tok.merges) + len(tok.special_tokens)
    assert tok.special_tokens == {EOT: 296, "<|pad|>": 297}
    assert tok.eot_id == 296


def test_encode_refuses_special_tokens_unless_allowed(tok):
    with pytest.raises(ValueError, match="special token '<\\|endoftext\\|>' at character 2"):
        tok.encode(f"hi{EOT}")
    assert tok.encode(f"hi{EOT}", allowed_special="all")[-1] == tok.eot_id
    assert tok.encode(f"hi{EOT}", allowed_special={EOT})[-1] == tok.eot_id
    assert tok.eot_id not in tok.encode_ordinary(f"hi{EOT}")
    with pytest.raises(ValueError, match="<\\|pad\\|>"):
        tok.encode(f"{EOT}<|pad|>", allowed_special={EOT})
    with pytest.raises(ValueError, match="not registered"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_naive_and_fast_tokenizers_agree_and_round_trip(tok):
    slow = Tokenizer(tok.merges, tok.pattern, list(tok.special_tokens), encoder="naive")
    text = TEXT[:300] + EOT + "ünïcödé"
    assert slow.encode(text, "all") == tok.encode(text, "all")
    assert tok.decode(tok.encode(text, "all")) == slow.decode(slow.encode(text, "all")) == text


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        naive.decode_ids([-1], tok.merges)


def test_trainer_never_merges_across_a_special_token():
    merges = fast.train_merges(f"ab{EOT}ab{EOT}ab", 300, special_tokens=[EOT])
    assert merges == naive.train_merges(f"ab{EOT}ab{EOT}ab", 300, special_tokens=[EOT]) == [(97, 98)]


def test_vocab_size_below_256_plus_specials_is_an_error():
    with pytest.raises(ValueError, match="at least 257"):
        train("abc", 256, special_tokens=[EOT])


def test_register_special_tokens_appends_ids(tok):
    extra = Tokenizer(tok.merges, tok.pattern, [EOT])
    assert extra.register_special_tokens(["<|user|>"]) == {"<|user|>": extra.vocab_size - 1}
    assert extra.encode("<|user|>hi", allowed_special="all")[0] == extra.vocab_size - 1


def test_saved_tokenizer_loads_back_identical(tok, tmp_path):
    path = tok.save(tmp_path / "t.json")
    back = load(path)
    assert (back.merges, back.pattern, back.special_tokens) == (tok.merges, tok.pattern, tok.special_tokens)
    assert back.encode(TEXT) == tok.encode(TEXT)
    doc = json.loads(path.read_text())
    assert doc["format"] == "handson-bpe" and doc["pattern_name"] == "gpt4"
    assert path.read_text().count("\n    [") == len(tok.merges)  # one merge per line


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format must be 'handson-bpe'"):
        load(path)
    with pytest.raises(FileNotFoundError, match="python -m impl.bpe train"):
        load(tmp_path / "missing.json")


def test_tiktoken_adapter_refuses_duplicate_token_bytes():
    merges = [(97, 98), (256, 99), (98, 99), (97, 258)]  # "abc" twice: ab+c and a+bc
    with pytest.raises(ValueError, match="same bytes"):
        tiktoken_bpe.encode_ids("abc", merges, GPT2_SPLIT_PATTERN)


def test_cli_trains_encodes_and_decodes(cache, tmp_path, capsys):
    out = tmp_path / "cli.json"
    main(["train", "--vocab-size", "300", "--corpus", str(cache), "--out", str(out), "--quiet"])
    assert "saved to" in capsys.readouterr().out
    main(["encode", "--tokenizer", str(out), "To be 😀"])
    ids = capsys.readouterr().out.split()
    main(["decode", "--tokenizer", str(out), *ids])
    assert capsys.readouterr().out == "To be 😀"
    with pytest.raises(SystemExit, match="special token"):
        main(["encode", "--tokenizer", str(out), EOT])


def test_default_tokenizer_is_trained_once_into_the_cache(cache):
    path = default_tokenizer_path(vocab_size=300, corpus=str(cache))
    assert path == default_path(300, str(cache)) and path.parent.name == "bpe"
    stamp = path.stat().st_mtime_ns
    assert default_tokenizer_path(vocab_size=300, corpus=str(cache)).stat().st_mtime_ns == stamp
    assert load(path).vocab_size == 300


def test_wikitext_offline_falls_back_with_one_line(monkeypatch, cache, capsys):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(wikitext, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(wikitext.WikiTextUnavailable, match="unreachable"):
        wikitext.load_wikitext("train")
    text, source = wikitext.load_wikitext_or_fallback("train", fallback=str(cache))
    assert text == TEXT and source == str(cache)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "using the" in err


def test_pipeline_trains_on_the_first_90_percent(monkeypatch, cache):
    text, source = training_text(str(cache))
    assert source == str(cache) and text == TEXT[: int(len(TEXT) * 0.9)]
