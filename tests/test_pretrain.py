"""Unit tests of project 3: token files, the training loop's tracking and resume, the 125M shape,
checkpointing, and the CLI. The spec's checks run in tests/test_specs.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from impl.data.tokens import CharTokenizer, random_batch
from impl.gpt.model import GPT, GPTConfig
from impl.pretrain import fast, naive
from impl.pretrain.__main__ import main
from impl.pretrain.config import counted_params, gpt_125m, param_count, shape_of, train_preset
from impl.pretrain.data import load_token_files, text_pieces, write_token_files
from impl.pretrain.resume import markov_tokens
from impl.pretrain.train import load_pretrained, make_scaler, pretrain, sample_text
from impl.train.loop import TrainConfig, train
from impl.train.tracking import read_metrics
from tests.cases.pretrain import grad_case

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 40


def test_125m_shape_has_125m_parameters_and_heads_of_64():
    cfg = gpt_125m()
    assert cfg.n_embd // cfg.n_head == 64 and cfg.block_size == 1024
    assert param_count(**shape_of(cfg)) == counted_params(**shape_of(cfg)) == 125_624_576


def test_gpt2_small_shape_with_10k_vocab_is_short_of_125m():
    assert param_count(10_000, 1024, 12, 12, 768) == 93_522_432  # why we widen to 896


def test_text_pieces_encode_like_the_whole_text():
    from impl.bpe import default_tokenizer

    tok = default_tokenizer()
    text = "ROMEO.\nBut soft, what light\n\n\n  through yonder window breaks?\nIt is the east.\n" * 30
    pieces = list(text_pieces(text, piece_chars=50))
    assert "".join(pieces) == text and len(pieces) > 5
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_token_files_are_uint16_memmaps_that_roundtrip(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    files = write_token_files(TEXT[:3000], TEXT[3000:], tok, tmp_path, {"corpus": "test"}, progress=False)
    assert isinstance(files.train, np.memmap) and files.train.dtype == np.uint16
    assert tok.decode(files.train.tolist()) == TEXT[:3000]
    assert tok.decode(load_token_files(tmp_path).val.tolist()) == TEXT[3000:]
    assert files.meta["train_tokens"] == 3000 and files.vocab_size == tok.vocab_size


def test_missing_token_files_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="impl.pretrain prepare"):
        load_token_files(tmp_path)


def test_random_batch_reads_a_memmap_like_an_array(tmp_path):
    ids = markov_tokens(tmp_path / "ids.bin", 50, 500, seed=0)
    x1, y1 = random_batch(ids, 3, 8, torch.Generator().manual_seed(0))
    x2, y2 = random_batch(np.array(ids), 3, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1[:, 1:], y1[:, :-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_checkpointing_matches_full_activations_with_dropout(seed):
    """torch.utils.checkpoint replays the RNG, so even dropout masks are identical."""
    case = grad_case(seed, 2, 12, 2, 2, 4)
    case["config"]["dropout"] = 0.3
    outs = []
    for fn in (naive.gradients, fast.gradients):
        torch.manual_seed(seed)
        outs.append(fn(case["config"], case["state"], case["idx"], case["targets"]))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def _tiny_run(tmp_path, **overrides):
    cfg = GPTConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=8)
    tc = TrainConfig(max_iters=6, batch_size=2, block_size=8, eval_interval=3, eval_iters=1, log_interval=1,
                     warmup_iters=1, lr_decay_iters=6, **overrides)
    ids = markov_tokens(tmp_path / "ids.bin", 30, 300, seed=0)
    return cfg, tc, ids


def test_metrics_log_has_eval_and_step_rows(tmp_path):
    cfg, tc, ids = _tiny_run(tmp_path)
    torch.manual_seed(0)
    result = train(GPT(cfg), ids, ids, tc, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert [r["iter"] for r in rows if r["kind"] == "eval"] == [0, 3, 6]
    assert [r["iter"] for r in rows if r["kind"] == "step"] == list(range(6))
    assert [loss for _, loss in result.step_losses] == [r["loss"] for r in rows if r["kind"] == "step"]


def test_resume_drops_log_rows_written_after_the_checkpoint(tmp_path):
    cfg, tc, ids = _tiny_run(tmp_path)
    stopped = TrainConfig(**{**tc.__dict__, "stop_after": 5})
    train(GPT(cfg), ids, ids, stopped, tmp_path / "run", progress=False)
    assert max(r["iter"] for r in read_metrics(tmp_path / "run")) == 4  # steps 3, 4 follow checkpoint 3
    train(GPT(cfg), ids, ids, tc, tmp_path / "run", resume=True, progress=False)
    steps = [r["iter"] for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert steps == list(range(6))


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    cfg, tc, ids = _tiny_run(tmp_path, dtype="fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    train(GPT(cfg), ids, ids, TrainConfig(**{**tc.__dict__, "stop_after": 3}), tmp_path / "run",
          scaler=scaler, progress=False)
    fresh = torch.amp.GradScaler("cpu")
    train(GPT(cfg), ids, ids, TrainConfig(**{**tc.__dict__, "stop_after": 3}), tmp_path / "run", resume=True,
          scaler=fresh, progress=False)
    assert fresh.get_scale() == scaler.get_scale() != 2.0**16


def test_fp16_needs_a_scaler_and_gets_one():
    assert make_scaler("fp32", "cpu") is None and make_scaler("bf16", "cpu") is None
    assert isinstance(make_scaler("fp16", "cpu"), torch.amp.GradScaler)


def test_tensorboard_without_the_package_still_logs_jsonl(tmp_path, capsys):
    cfg, tc, ids = _tiny_run(tmp_path, tensorboard=True)
    train(GPT(cfg), ids, ids, tc, tmp_path / "run", progress=False)
    assert read_metrics(tmp_path / "run")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in capsys.readouterr().out
    else:
        assert (tmp_path / "run" / "tensorboard").is_dir()


def test_pretrain_then_load_and_sample(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    files = write_token_files(TEXT[:3000], TEXT[3000:], tok, tmp_path / "tokens", progress=False)
    model_cfg, train_cfg = train_preset("small", max_iters=4, eval_interval=2, eval_iters=1, batch_size=2,
                                        block_size=16, log_interval=1)
    model_cfg = GPTConfig(**{**model_cfg.to_dict(), "vocab_size": tok.vocab_size, "block_size": 16,
                             "n_layer": 1, "n_embd": 64, "n_head": 1})
    model, result = pretrain(files, model_cfg, train_cfg, tmp_path / "run", progress=False)
    assert result.iters == 4 and math.isfinite(result.final_val_loss)
    loaded, meta = load_pretrained(tmp_path / "run", "last")
    assert meta["tokens"]["vocab_size"] == tok.vocab_size
    pairs = zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    text = sample_text(loaded, tok, "To be", n_tokens=10, seed=0)
    assert len(text) == 10 and set(text) <= set(tok.chars)
    with pytest.raises(ValueError, match="n_tokens"):
        sample_text(loaded, tok, "To be", n_tokens=16)


def test_pretrain_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    files = write_token_files(TEXT[:3000], TEXT[3000:], tok, tmp_path, progress=False)
    model_cfg, train_cfg = train_preset("small")
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(files, GPTConfig(**{**model_cfg.to_dict(), "vocab_size": 3}), train_cfg, progress=False)


def test_cli_prepare_train_resume_sample(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 3)
    data, out = str(tmp_path / "tokens"), str(tmp_path / "run")
    assert main(["prepare", "--corpus", str(corpus), "--data", data]) == 0
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["vocab_size"] == 10_000 and meta["corpus"] == str(corpus)
    common = ["train", "--data", data, "--out", out, "--n-layer", "1", "--n-embd", "64", "--n-head", "1",
              "--block-size", "16", "--batch-size", "2", "--max-iters", "4", "--eval-interval", "2",
              "--eval-iters", "1", "--log-interval", "1"]
    assert main(common + ["--stop-after", "3"]) == 0
    assert main(common + ["--resume", "--gradient-checkpointing"]) == 0
    assert "4 iters" in capsys.readouterr().out
    assert main(["sample", "--out", out, "--which", "last", "--prompt", "To be", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("To be")


def test_cli_help_lists_the_three_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("prepare", "train", "sample"))
