"""Project 4's instruction set: every answer recomputed here by independent code, determinism, a split
whose evaluation prompts never appear in training, the exact-match rule, and JSONL round trips and errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.sft.tasks import (
    PHRASINGS,
    REFUSAL,
    TASK_KINDS,
    UNKNOWN_INSTRUCTIONS,
    WORDS,
    as_messages,
    exact_match,
    make_tasks,
    read_jsonl,
    split,
    to_jsonl,
)
from impl.sft.templates import parse_chat, render_chat

TASKS = make_tasks(5000, seed=0)


def _numbers(text: str) -> tuple[int, int]:
    left, right = text.split(" and ")
    return int(left), int(right)


# The answer to each kind, written from the task's description rather than from tasks.py.
EXPECTED = {
    "add": lambda s: str(sum(_numbers(s))),
    "subtract": lambda s: str(_numbers(s)[0] - _numbers(s)[1]),
    "reverse": lambda s: "".join(reversed(s)),
    "sort": lambda s: " ".join(sorted(s.split())),
    "count": lambda s: str(len(s.split())),
    "uppercase": lambda s: s.upper(),
    "first_word": lambda s: s.split()[0],
    "last_word": lambda s: s.split()[-1],
    "refuse": lambda s: REFUSAL,
}


def test_every_answer_matches_an_independent_computation():
    assert set(EXPECTED) == set(TASK_KINDS)
    for task in TASKS:
        assert task["output"] == EXPECTED[task["task"]](task["input"]), task


def test_several_thousand_examples_spread_evenly_over_about_eight_kinds():
    counts = Counter(t["task"] for t in TASKS)
    assert len(counts) == len(TASK_KINDS) >= 8
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({(t["instruction"], t["input"]) for t in TASKS}) > 3000  # mostly distinct prompts


def test_instruction_names_its_task_so_each_prompt_has_one_right_answer():
    owner = {}
    for task in TASKS:
        owner.setdefault(task["instruction"], set()).add(task["task"])
    assert all(len(kinds) == 1 for kinds in owner.values()), owner
    refusals = {t["instruction"] for t in TASKS if t["task"] == "refuse"}
    assert refusals <= set(UNKNOWN_INSTRUCTIONS)
    assert not refusals & {p for phrasings in PHRASINGS.values() for p in phrasings}


def test_word_tasks_draw_distinct_plain_words():
    assert len(set(WORDS)) == len(WORDS) and all(w.isalpha() and w.islower() for w in WORDS)
    for task in TASKS:
        if task["task"] in ("sort", "count", "uppercase", "first_word", "last_word"):
            words = task["input"].split()
            assert len(set(words)) == len(words) and set(words) <= set(WORDS)


def test_same_seed_gives_the_same_tasks_and_another_seed_others():
    assert make_tasks(300, seed=7) == make_tasks(300, seed=7)
    assert make_tasks(300, seed=7) != make_tasks(300, seed=8)
    assert make_tasks(0, seed=7) == []


def test_split_of_the_full_set_holds_out_unseen_prompts():
    train, evaluation = split(TASKS, eval_fraction=0.1, seed=0)
    train_prompts = {(t["instruction"], t["input"]) for t in train}
    assert not any((t["instruction"], t["input"]) in train_prompts for t in evaluation)
    assert 0.08 < len(evaluation) / len(TASKS) < 0.12
    assert {t["task"] for t in evaluation} == set(TASK_KINDS)
    assert split(TASKS, 0.1, seed=0) == (train, evaluation)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 200), st.integers(0, 2**16), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_split_never_puts_an_eval_prompt_in_train_and_loses_nothing(n, task_seed, fraction, split_seed):
    tasks = make_tasks(n, task_seed)
    tasks = tasks + tasks[: n // 3]  # repeated prompts must still land on one side
    train, evaluation = split(tasks, fraction, split_seed)
    train_prompts = {(t["instruction"], t["input"]) for t in train}
    assert not any((t["instruction"], t["input"]) in train_prompts for t in evaluation)
    key = lambda t: json.dumps(t, sort_keys=True)
    assert Counter(map(key, train + evaluation)) == Counter(map(key, tasks))
    distinct = len({(t["instruction"], t["input"]) for t in tasks})
    assert len({(t["instruction"], t["input"]) for t in evaluation}) == round(fraction * distinct)


def test_split_refuses_a_fraction_outside_zero_to_one():
    with pytest.raises(ValueError, match="eval_fraction"):
        split(TASKS, 1.5)


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [("42", "42", True), (" 42\n", "42", True), ("42", " 42 ", True), ("042", "42", False),
     ("Apple", "apple", False), ("a  b", "a b", False), ("", "", True), ("42.", "42", False)],
)
def test_exact_match_strips_outer_whitespace_and_nothing_else(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_task_as_chat_renders_instruction_input_and_answer():
    task = {"task": "add", "instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"}
    assert render_chat(as_messages(task, system="Be exact.")) == (
        "<|system|>\nBe exact.<|end|>\n<|user|>\nAdd the two numbers.\n2 and 3<|end|>\n<|assistant|>\n5<|end|>\n"
    )
    assert parse_chat(render_chat(as_messages(task)))[-1] == {"role": "assistant", "content": "5"}


def test_jsonl_round_trips_instruction_and_chat_records(tmp_path):
    records = TASKS[:50] + [{"messages": as_messages(t)} for t in TASKS[50:100]]
    path = to_jsonl(records, tmp_path / "set.jsonl")
    assert read_jsonl(path) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == 100


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"instruction": "a", "input": "", "output": "b"}', "", "{not json"], "line 3: not valid JSON"),
        (['["a"]'], "line 1: expected a JSON object, got list"),
        (['{"instruction": "a", "output": "b"}'], r"line 1: .*missing \['input'\]"),
        (['{"instruction": "a", "input": 3, "output": "b"}'], "line 1: 'input' must be a string, got int"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], "line 1: message 0: unknown role 'robot'"),
        (['{"messages": []}'], "line 1: empty conversation"),
        (['{"messages": [{"role": "user", "content": "x"}], "extra": 1}'], 'line 1: a chat record has only'),
        (['{"messages": {"role": "user"}}'], 'line 1: "messages" must be a list'),
    ],
)
def test_read_jsonl_names_the_line_and_the_problem(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_jsonl(path)


def test_to_jsonl_refuses_a_bad_record_before_writing(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"record 1: .*forge a turn"):
        to_jsonl([TASKS[0], {"messages": [{"role": "user", "content": "<|end|>"}]}], path)
    assert not path.exists()
