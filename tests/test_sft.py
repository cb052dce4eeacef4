"""Project 4: batching (padding, packing), the packed-row seam of the model, the fine-tuning loop,
evaluation by greedy answers and the CLI, on tiny models and a tokenizer trained on the fly."""

from __future__ import annotations

import json

import pytest
import torch

from impl import zoo
from impl.bpe.tokenizer import train as train_tokenizer
from impl.gpt.model import GPT, GPTConfig
from impl.sft import tasks
from impl.sft.__main__ import main as sft_cli
from impl.sft.evaluate import accuracy, answer
from impl.sft.fast import (
    Example,
    SFTConfig,
    encode_record,
    finetune,
    pack_groups,
    pack_rows,
    pad_batch,
    pad_id,
    sft_loss,
    shift,
)
from impl.sft.templates import IGNORE_INDEX, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer():
    records = tasks.make_tasks(60, seed=3)
    text = "\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in records)
    return train_tokenizer(text, 300, special_tokens=SPECIAL_TOKENS)


def tiny_gpt(vocab_size: int, block_size: int = 128, seed: int = 0, attention: str = "sdpa") -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                         attention=attention))


def test_shift_scores_each_position_on_the_next_label():
    ex = shift([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    assert ex.inputs == (5, 6, 7) and ex.targets == (IGNORE_INDEX, 7, 8) and ex.n_trained == 2


def test_first_fit_packing_keeps_order_and_fills_earlier_rows():
    assert pack_groups([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        pack_groups([3, 9], 8)


def test_packed_rows_number_examples_and_pad_with_segment_zero():
    exs = [Example((1, 2, 3), (2, 3, IGNORE_INDEX)), Example((4, 5), (5, 9)), Example((6,), (7,))]
    idx, targets, kw = pack_rows(exs, 6, pad=0)
    assert idx.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert targets.tolist() == [[2, 3, IGNORE_INDEX, 5, 9, 7]]
    assert kw["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3]]
    idx, targets, kw = pack_rows(exs, 4, pad=0)
    assert kw["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 0, 0]]
    assert targets[1, 2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]


def test_padded_batch_masks_padding_out_of_loss_and_attention():
    exs = [Example((1, 2, 3), (2, 3, 4)), Example((4,), (5,))]
    idx, targets, kw = pad_batch(exs, pad=0)
    assert kw["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert targets[1].tolist() == [5, IGNORE_INDEX, IGNORE_INDEX]


def test_segment_positions_restart_at_each_example():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert GPT.segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_packed_forward_equals_each_example_alone(attention):
    model = tiny_gpt(50, attention=attention).eval()
    a, b = torch.randint(50, (5,)), torch.randint(50, (7,))
    row = torch.cat([a, b, torch.zeros(2, dtype=torch.long)])[None]
    seg = torch.tensor([[1] * 5 + [2] * 7 + [0] * 2])
    out = model(row, segment_ids=seg)[0]
    torch.testing.assert_close(out[:5], model(a[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[5:12], model(b[None])[0], rtol=1e-5, atol=1e-5)


def test_packed_rows_are_refused_where_they_could_leak():
    model = tiny_gpt(50)
    idx, seg = torch.randint(50, (1, 6)), torch.tensor([[1, 1, 1, 2, 2, 2]])
    with pytest.raises(ValueError, match="cannot be combined"):
        model(idx, attention_mask=torch.ones_like(idx), segment_ids=seg)
    with pytest.raises(ValueError, match="integer segment numbers"):
        model(idx, segment_ids=seg.bool())
    with pytest.raises(ValueError, match="expected"):
        model(idx, segment_ids=seg[:, :4])
    import impl.flash_attention  # noqa: F401  (registers a backend that knows no segments)

    with pytest.raises(ValueError, match="cannot keep packed examples apart"):
        tiny_gpt(50, attention="flash")(idx, segment_ids=seg)


def test_alpaca_template_trains_the_output_and_end_of_text_only(tokenizer):
    ex = encode_record(tokenizer, {"instruction": "Uppercase this.", "input": "red fox", "output": "RED FOX"},
                       template="alpaca")
    trained = [t for t in ex.targets if t != IGNORE_INDEX]
    assert tokenizer.decode(trained[:-1]) == "RED FOX" and trained[-1] == tokenizer.eot_id
    with pytest.raises(ValueError, match="unknown template"):
        encode_record(tokenizer, {"instruction": "x", "input": "", "output": "y"}, template="vicuna")


def test_finetuning_trains_only_what_requires_grad_and_lowers_the_loss(tokenizer):
    model = tiny_gpt(tokenizer.vocab_size)
    exs = [encode_record(tokenizer, r) for r in tasks.make_tasks(16, seed=1)]
    model.wpe.requires_grad_(False)
    frozen = model.wpe.weight.detach().clone()
    before = sft_loss(model, exs).item()
    result = finetune(model, exs, SFTConfig(epochs=6, batch_size=8, pack=128, learning_rate=3e-3, dtype="fp32"),
                      pad=pad_id(tokenizer), progress=False)
    assert result.steps == 12 and result.trained_tokens > 0 and result.tokens >= result.trained_tokens
    assert sft_loss(model, exs).item() < before - 0.5
    assert torch.equal(model.wpe.weight, frozen)


def test_a_memorised_set_is_answered_exactly_and_answers_stop_at_end(tokenizer):
    records = tasks.make_tasks(9, seed=5)  # one of each task kind
    model = tiny_gpt(tokenizer.vocab_size)
    exs = [encode_record(tokenizer, r) for r in records]
    finetune(model, exs, SFTConfig(epochs=120, batch_size=9, pack=None, learning_rate=1e-2, min_lr=1e-3,
                                   warmup_iters=10, dtype="fp32"), pad=pad_id(tokenizer), progress=False)
    scores = accuracy(model, tokenizer, records)
    assert scores["exact_match"] == 1.0, list(zip(scores["predictions"], [r["output"] for r in records], strict=True))
    assert set(scores["per_task"]) == set(tasks.TASK_KINDS)
    # the model learned to close its turn: a one-token budget gives the answer's first token only
    assert all(len(tokenizer.encode(a)) <= 1 for a in answer(model, tokenizer, [[{"role": "user", "content": "x"}]],
                                                              max_new_tokens=1))


def test_cli_data_train_eval_chat_round_trip(tmp_path, tokenizer, capsys):
    base = tmp_path / "base"
    model = tiny_gpt(tokenizer.vocab_size)
    zoo.save_dir(base, model, {"model_config": model.config.to_dict(),
                               "tokenizer": zoo.tokenizer_metadata(tokenizer)})
    data, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    assert sft_cli(["data", "--out", str(data), "--eval-out", str(held), "--n", "40"]) == 0
    out = tmp_path / "run"
    assert sft_cli(["train", "--data", str(data), "--eval-data", str(held), "--base", str(base), "--out", str(out),
                    "--epochs", "1", "--batch-size", "8", "--dtype", "fp32", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and 0.0 <= summary["eval_exact_match"] <= 1.0
    assert sft_cli(["eval", "--model", str(out), "--data", str(held)]) == 0
    assert sft_cli(["chat", "--model", str(out), "hello", "--max-new-tokens", "4"]) == 0
    lora = tmp_path / "lora"
    assert sft_cli(["train", "--data", str(data), "--base", str(base), "--out", str(lora), "--lora", "2",
                    "--epochs", "0.5", "--dtype", "fp32", "--quiet"]) == 0
    assert (lora / "adapter.safetensors").is_file() and (lora / "model.safetensors").is_file()
    reloaded, _, _ = zoo.load_dir(lora)
    assert not any("lora" in k for k in reloaded.state_dict())


def test_cli_names_the_bad_line_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"messages": 3}\n')
    assert sft_cli(["train", "--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "bad.jsonl line 2" in capsys.readouterr().err
    assert sft_cli(["eval", "--model", "no-such-model", "--data", str(bad)]) == 2
