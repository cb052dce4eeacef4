"""Preference data: records ``{"prompt", "chosen", "rejected"}``, their JSONL files, programmatic pairs
from the SFT tasks, and their tokenization through the chat template.

A record's ``prompt`` is either a string (one user message) or a list of chat messages
(``{"role", "content"}``, as ``impl.sft.templates.check_messages`` accepts, not ending with an assistant
turn); ``chosen`` and ``rejected`` are the two assistant answers, different strings. Other keys (``task``)
are kept. The model sees ``render_chat(prompt messages, add_generation_prompt=True)`` and is scored on the
answer followed by ``<|end|>``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from impl.sft.tasks import REFUSAL, as_messages, read_jsonl, to_jsonl
from impl.sft.templates import END, check_messages, tokenize_chat

FIELDS = ("prompt", "chosen", "rejected")


def prompt_messages(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a record's ``prompt``: a string becomes one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def record_problem(record: Any) -> str | None:
    """What is wrong with a preference record, naming the field, or None when it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in FIELDS if k not in record]
    if missing:
        return f"missing field {missing[0]!r} (a preference record has prompt, chosen, rejected)"
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            return 'field "prompt": empty string'
    elif isinstance(prompt, list):
        try:
            check_messages(prompt)
        except ValueError as err:
            return f'field "prompt": {err}'
        if prompt[-1]["role"] == "assistant":
            return 'field "prompt": the last message is the assistant\'s; the answer goes in chosen / rejected'
    else:
        return f'field "prompt": must be a string or a list of chat messages, got {type(prompt).__name__}'
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], str):
            return f"field {key!r}: must be a string, got {type(record[key]).__name__}"
        try:
            check_messages([{"role": "assistant", "content": record[key]}])
        except ValueError as err:
            return f"field {key!r}: {str(err).split(': ', 1)[-1]}"
    if record["chosen"] == record["rejected"]:
        return 'fields "chosen" and "rejected" are the same answer: the pair prefers nothing'
    return None


def write_preferences(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write ``records`` one JSON object a line (UTF-8); ValueError naming the record index and field of the
    first bad record, before anything is written. Returns the path."""
    return to_jsonl(records, path, record_problem)


def read_preferences(path: str | Path) -> list[dict[str, Any]]:
    """The records of a preference JSONL file (blank lines skipped); ValueError
    ``"{path} line {n}: {what is wrong}"`` on the first line that is not a valid record."""
    records = read_jsonl(path, record_problem)
    if not records:
        raise ValueError(f"{path}: no preference records (an empty file)")
    return records


# ---------------------------------------------------------------- programmatic pairs


def _swap_two(items: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(items) - 1)
    return [*items[:i], items[i + 1], items[i], *items[i + 2:]]


def _wrong_answer(task: dict[str, str], rng: random.Random) -> str:
    """A plausible wrong answer for ``task``: the mistake a half-trained model makes on that kind."""
    kind, answer, words = task["task"], task["output"], task["input"].split()
    if kind == "refuse":  # an answer where a refusal was due
        return rng.choice([task["input"].upper(), task["input"][::-1], f"Sure: {task['input']}"])
    if rng.random() < 0.2:  # a refusal where an answer was due
        return REFUSAL
    if kind in ("add", "subtract", "count"):  # off by one (a count never drops below 1)
        step = rng.choice([-1, 1]) if int(answer) > 1 or kind != "count" else 1
        return str(int(answer) + step)
    if kind == "reverse":  # the word unreversed, or reversed with two letters swapped
        wrong = words[0] if rng.random() < 0.5 else "".join(_swap_two(list(answer), rng))
        return wrong if wrong != answer else answer[1:] + answer[0]
    if kind == "sort":  # two neighbours out of order, or the list in reverse order
        ordered = answer.split()
        return " ".join(_swap_two(ordered, rng) if rng.random() < 0.5 else ordered[::-1])
    if kind == "uppercase":  # the wrong case
        return answer.lower() if rng.random() < 0.5 else answer.title()
    if kind == "first_word":
        return rng.choice(words[1:])
    if kind == "last_word":
        return rng.choice(words[:-1])
    raise ValueError(f"no wrong answer is known for task kind {kind!r}")


def pairs_from_tasks(tasks: Sequence[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """One preference record per task (``impl.sft.tasks.make_tasks`` records): the prompt is the user turn
    of ``as_messages(task)``, chosen the right answer, rejected a plausible wrong one for the task's kind
    (off by one, two words out of order, wrong case, a refusal where an answer was due, an answer where a
    refusal was due, ...); ``task`` names the kind. The same ``(tasks, seed)`` always gives the same list."""
    rng = random.Random(seed)
    pairs = []
    for task in tasks:
        rejected = _wrong_answer(task, rng)
        assert rejected != task["output"], f"wrong answer equals the right one for {task}"
        user = as_messages(task)[-2]["content"]
        pairs.append({"prompt": user, "chosen": task["output"], "rejected": rejected, "task": task["task"]})
    return pairs


def tokenize_pair(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)``: the prompt through the chat template with the generation
    prompt, each completion the answer's ids followed by ``<|end|>``'s id (never empty)."""
    prompt_ids, _ = tokenize_chat(tokenizer, prompt_messages(record["prompt"]), add_generation_prompt=True)
    end = tokenizer.special_tokens[END]
    chosen = [*tokenizer.encode(record["chosen"]), end] if record["chosen"] else [end]
    rejected = [*tokenizer.encode(record["rejected"]), end] if record["rejected"] else [end]
    return prompt_ids, chosen, rejected


__all__ = ["FIELDS", "pairs_from_tasks", "prompt_messages", "read_preferences", "record_problem",
           "tokenize_pair", "write_preferences"]
