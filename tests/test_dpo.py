"""Unit tests of project 6 (DPO): data, loss, reference cache, training, CLI. The spec-driven checks
(ours == TRL, naive == fast, ln 2, mutants) run from tests/test_specs.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from impl.bpe.tokenizer import Tokenizer
from impl.dpo import fast
from impl.dpo.__main__ import load_model, main
from impl.dpo.data import pairs_from_tasks, read_preferences, tokenize_pair, write_preferences
from impl.gpt.model import GPT, GPTConfig
from impl.sft.tasks import REFUSAL, TASK_KINDS, exact_match, make_tasks
from impl.sft.templates import END, SPECIAL_TOKENS
from impl.train.checkpoint import save_checkpoint

TASKS = make_tasks(90, seed=3)


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE (no merges) with the chat special tokens: 262 ids."""
    return Tokenizer([], "gpt4", SPECIAL_TOKENS)


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=192, n_layer=1, n_head=2, n_embd=32))


def short_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs of the short-answer kinds (arithmetic, count, first / last word): short sequences, fast tests."""
    kinds = {"add", "subtract", "count", "first_word", "last_word"}
    return [p for p in pairs_from_tasks(make_tasks(8 * n, seed=seed), seed=seed) if p["task"] in kinds][:n]


# ---------------------------------------------------------------- data


def test_pairs_are_deterministic_and_chosen_is_the_right_answer_and_rejected_differs():
    pairs = pairs_from_tasks(TASKS, seed=1)
    assert pairs == pairs_from_tasks(TASKS, seed=1)
    assert pairs != pairs_from_tasks(TASKS, seed=2)
    assert {p["task"] for p in pairs} == set(TASK_KINDS)
    for task, pair in zip(TASKS, pairs, strict=True):
        assert exact_match(pair["chosen"], task["output"])
        assert not exact_match(pair["rejected"], task["output"])
        assert task["instruction"] in pair["prompt"] and task["input"] in pair["prompt"]


def test_wrong_answers_follow_their_task_kind():
    for task, pair in zip(TASKS, pairs_from_tasks(TASKS, seed=0), strict=True):
        wrong = pair["rejected"]
        if task["task"] == "refuse":  # an answer where a refusal was due
            assert wrong != REFUSAL
        elif wrong == REFUSAL:  # a refusal where an answer was due
            continue
        elif task["task"] in ("add", "subtract", "count"):
            assert abs(int(wrong) - int(task["output"])) == 1
        elif task["task"] == "sort":
            assert sorted(wrong.split()) == task["output"].split()  # the same words, out of order
        elif task["task"] == "uppercase":
            assert wrong.upper() == task["output"]
        elif task["task"] in ("first_word", "last_word"):
            assert wrong in task["input"].split()


def test_tokenize_pair_is_the_chat_prompt_then_the_answer_and_end(tmp_path):
    tok = byte_tokenizer()
    record = {"prompt": "Add the two numbers.\n1 and 2", "chosen": "3", "rejected": "4"}
    prompt, chosen, rejected = tokenize_pair(tok, record)
    assert tok.decode(prompt) == "<|user|>\nAdd the two numbers.\n1 and 2<|end|>\n<|assistant|>\n"
    assert tok.decode(chosen) == "3" + END and tok.decode(rejected) == "4" + END
    as_messages = dict(record, prompt=[{"role": "user", "content": record["prompt"]}])
    assert tokenize_pair(tok, as_messages) == (prompt, chosen, rejected)


def test_preference_jsonl_round_trips(tmp_path):
    pairs = pairs_from_tasks(TASKS[:9], seed=0)
    assert read_preferences(write_preferences(pairs, tmp_path / "p.jsonl")) == pairs


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "q", "chosen": "a"}', "line 2: missing field 'rejected'"),
    ('{"prompt": "q", "chosen": "a", "rejected": 3}', "line 2: field 'rejected': must be a string"),
    ('{"prompt": 5, "chosen": "a", "rejected": "b"}', 'line 2: field "prompt": must be a string'),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "line 2: fields \"chosen\" and \"rejected\" are the same"),
    ('{"prompt": "q", "chosen": "a<|end|>", "rejected": "b"}', "line 2: field 'chosen': content contains"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a", '
     '"rejected": "b"}', "line 2: field \"prompt\": the last message is the assistant's"),
    ('{"prompt": "q", "chosen": "a", ', "line 2: not valid JSON"),
])
def test_a_bad_preference_line_is_named_with_its_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(ValueError, match="bad.jsonl " + message.replace("(", r"\(").replace("|", r"\|")):
        read_preferences(path)


def test_writing_a_bad_record_names_its_index_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="record 1: missing field 'chosen'"):
        write_preferences([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}], tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()


# ---------------------------------------------------------------- loss


def test_loss_is_ln2_at_policy_equal_to_reference_and_label_smoothing_follows_its_formula():
    logps = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -1.0])
    loss, chosen_rewards, rejected_rewards = fast.dpo_loss(*logps, *logps, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0
    ref = torch.tensor([-3.5, -7.0]), torch.tensor([-3.0, -2.0])
    z = 0.3 * ((logps[0] - ref[0]) - (logps[1] - ref[1]))
    smoothed, _, _ = fast.dpo_loss(*logps, *ref, beta=0.3, label_smoothing=0.2)
    expected = (0.8 * torch.nn.functional.softplus(-z) + 0.2 * torch.nn.functional.softplus(z)).mean()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_rejects_an_unknown_type_and_a_non_positive_beta():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="loss_type"):
        fast.dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        fast.dpo_loss(x, x, x, x, beta=0.0)


def test_padding_does_not_change_a_sequences_log_prob():
    model = tiny_gpt(50)
    short, long = ([1, 2, 3], [4], [5]), ([1, 2, 3, 6, 7], [8, 9, 10, 11], [12])
    alone = fast.sequence_logps(model, fast.collate([short]))
    padded = fast.sequence_logps(model, fast.collate([short, long]))
    torch.testing.assert_close(padded[[0, 2]], alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- reference cache and training


class CountingGPT(GPT):
    """A GPT that counts the sequences it is run on."""

    sequences = 0

    def forward(self, idx, *args, **kwargs):
        type(self).sequences += idx.shape[0]
        return super().forward(idx, *args, **kwargs)


def test_reference_cache_runs_the_reference_once_per_pair_across_epochs():
    tok = byte_tokenizer()
    records = short_pairs(3)
    torch.manual_seed(0)
    reference = CountingGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=192, n_layer=1, n_head=2, n_embd=32))
    policy = tiny_gpt(tok.vocab_size)
    CountingGPT.sequences = 0
    result = fast.train_dpo(policy, reference, tok, records, steps=4, batch_size=2, lr=1e-3, progress=False)
    assert result.reference_pairs_computed == len(records)  # 4 steps x 2 pairs: every pair seen 2-3 times
    assert CountingGPT.sequences == 2 * len(records)  # chosen + rejected, once each


def test_dpo_raises_preference_accuracy_on_its_training_pairs():
    tok = byte_tokenizer()
    records = short_pairs(12, seed=1)
    policy, reference = tiny_gpt(tok.vocab_size, seed=1), tiny_gpt(tok.vocab_size, seed=1)
    before = fast.preference_accuracy(policy, None, tok, records)
    result = fast.train_dpo(policy, reference, tok, records, beta=0.1, steps=16, lr=5e-3, batch_size=6,
                            log_every=1, progress=False)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1: policy == reference
    after = fast.preference_accuracy(policy, reference, tok, records)
    assert after >= 0.9 and after > before, (before, after)
    assert result.history[-1]["reward_margin"] > 0 and result.history[-1]["loss"] < math.log(2)


# ---------------------------------------------------------------- CLI


def write_tiny_model(directory, tok: Tokenizer):
    meta = {"model_config": tiny_gpt(tok.vocab_size).config.to_dict(),
            "tokenizer": {"kind": "bpe", "vocab_size": tok.vocab_size, "pattern": tok.pattern,
                          "pattern_name": tok.pattern_name, "special_tokens": tok.special_tokens, "merges": []}}
    save_checkpoint(directory / "model.safetensors", tiny_gpt(tok.vocab_size), meta=meta)


def test_cli_pairs_then_train_then_eval_end_to_end(tmp_path, capsys):
    tok = byte_tokenizer()
    write_tiny_model(tmp_path, tok)
    assert main(["pairs", "--out", str(tmp_path / "all.jsonl"), "--n", "200"]) == 0
    write_preferences(short_pairs(12, seed=2), tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "prefs.jsonl"), "--model", str(tmp_path), "--out", str(out),
                 "--steps", "6", "--lr", "5e-3", "--batch-size", "6", "--log-every", "2", "--quiet"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history["history"]] == [2, 4, 6]
    assert (out / "dpo_training.png").stat().st_size > 0
    trained, tokenizer, meta = load_model(str(out))
    assert meta["dpo"]["steps"] == 6 and tokenizer.special_tokens == tok.special_tokens
    capsys.readouterr()
    assert main(["eval", "--data", str(tmp_path / "prefs.jsonl"), "--model", str(out),
                 "--reference", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["preference_accuracy"] > 0.5


def test_cli_names_the_bad_line_and_exits_2(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    code = main(["train", "--data", str(tmp_path / "bad.jsonl"), "--model", "bpe-base", "--out", str(tmp_path)])
    assert code == 2
    assert "bad.jsonl line 2: missing field 'chosen'" in capsys.readouterr().err
