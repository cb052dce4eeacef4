"""The project's instruction set: generated tasks with short, exactly checkable answers.

``make_tasks(n, seed)`` draws ``n`` records ``{"task", "instruction", "input", "output"}`` round-robin
over ``TASK_KINDS`` (so every kind gets n / len(TASK_KINDS) examples, give or take one), each from
a ``random.Random(seed)``: same ``(n, seed)``, same list. Every answer is a function of the input that
a test recomputes independently; ``refuse`` answers an instruction outside the set with ``REFUSAL``.
``split`` keeps evaluation prompts unseen: records sharing a prompt (instruction + input) land on
the same side.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from impl.sft.templates import check_messages

REFUSAL = "Sorry, I can't do that."

# Plain lowercase words (no two alike) the word tasks draw from.
WORDS = tuple("""
apple river stone cloud bread horse candle mirror garden winter silver forest window basket lemon
tiger paper music ocean pencil rabbit castle honey jacket island kettle ladder monkey needle orange
pocket queen rocket saddle ticket valley wagon yellow zebra anchor button copper dragon engine feather
gravel hammer insect jungle kitten lizard marble napkin oyster puzzle quilt ribbon spider tunnel
velvet walnut cactus donkey falcon goblet harbor meadow parrot violin
""".split())

# Instructions outside the set: the model should answer these with REFUSAL, not guess.
UNKNOWN_INSTRUCTIONS = (
    "Translate the word into Klingon.",
    "Predict tomorrow's weather for the word.",
    "Draw a picture of the word.",
    "Sing the word as a song.",
    "Tell me the smell of the word.",
    "Send the word to my email address.",
    "Play the word on the piano.",
    "Book a flight to the word.",
)

# Several phrasings per kind, so the model learns the task rather than one sentence.
PHRASINGS = {
    "add": ("Add the two numbers.", "What is the sum of the two numbers?", "Compute the sum."),
    "subtract": ("Subtract the second number from the first.", "What is the first number minus the second?"),
    "reverse": ("Reverse the letters of the word.", "Write the word backwards."),
    "sort": ("Sort the words alphabetically.", "Put the words in alphabetical order."),
    "count": ("Count the words.", "How many words are there?"),
    "uppercase": ("Write the phrase in capital letters.", "Convert the phrase to uppercase."),
    "first_word": ("What is the first word?", "Give the first word."),
    "last_word": ("What is the last word?", "Give the last word."),
}


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _arith(sign: int) -> Callable[[random.Random], tuple[str, str]]:
    def make(rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} and {b}", str(a + sign * b)  # subtraction may go negative: "-12" is the exact answer
    return make


def _on_words(lo: int, hi: int, answer: Callable[[list[str]], str]) -> Callable[[random.Random], tuple[str, str]]:
    def make(rng: random.Random) -> tuple[str, str]:
        words = _words(rng, lo, hi)
        return " ".join(words), answer(words)
    return make


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _arith(+1),
    "subtract": _arith(-1),
    "reverse": _on_words(1, 1, lambda w: w[0][::-1]),
    "sort": _on_words(3, 6, lambda w: " ".join(sorted(w))),
    "count": _on_words(1, 9, lambda w: str(len(w))),
    "uppercase": _on_words(2, 5, lambda w: " ".join(w).upper()),
    "first_word": _on_words(2, 6, lambda w: w[0]),
    "last_word": _on_words(2, 6, lambda w: w[-1]),
}
TASK_KINDS = (*GENERATORS, "refuse")


def make_tasks(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` records ``{"task", "instruction", "input", "output"}``, kinds round-robin over ``TASK_KINDS``,
    contents drawn from ``random.Random(seed)``; the same arguments always give the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = TASK_KINDS[i % len(TASK_KINDS)]
        if kind == "refuse":
            instruction, (input_, output) = rng.choice(UNKNOWN_INSTRUCTIONS), (rng.choice(WORDS), REFUSAL)
        else:
            instruction = rng.choice(PHRASINGS[kind])
            input_, output = GENERATORS[kind](rng)
        tasks.append({"task": kind, "instruction": instruction, "input": input_, "output": output})
    return tasks


def prompt_key(task: dict[str, str]) -> tuple[str, str]:
    """What makes a prompt: ``(instruction, input)``; two records with the same key are the same question."""
    return task["instruction"], task["input"]


def split(tasks: list[dict[str, str]], eval_fraction: float, seed: int = 0
          ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, eval)``: the distinct prompts shuffled by ``seed`` and the first ``eval_fraction`` of them
    (rounded) sent to eval with every record that has them, so no eval prompt appears in train.
    Record order within each side follows ``tasks``."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    keys = sorted(set(map(prompt_key, tasks)))  # sorted first: the shuffle must not depend on set order
    random.Random(seed).shuffle(keys)
    held_out = set(keys[:round(eval_fraction * len(keys))])
    train = [t for t in tasks if prompt_key(t) not in held_out]
    evaluation = [t for t in tasks if prompt_key(t) in held_out]
    return train, evaluation


def exact_match(prediction: str, answer: str) -> bool:
    """True when ``prediction`` equals ``answer`` after stripping leading and trailing whitespace from both;
    everything else counts (case, inner spaces, punctuation): ``" 42\\n"`` matches ``"42"``, ``"Apple"``
    does not match ``"apple"``."""
    return prediction.strip() == answer.strip()


def as_messages(task: dict[str, str], system: str | None = None) -> list[dict[str, str]]:
    """The task as a chat: an optional system turn, the user turn (instruction, then the input on the
    next line when there is one) and the assistant's answer."""
    user = f"{task['instruction']}\n{task['input']}" if task["input"] else task["instruction"]
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": task["output"]}]


def _record_problem(record: Any) -> str | None:
    """What is wrong with a JSONL record, or None: an instruction record has string ``instruction``,
    ``input`` and ``output`` (other keys such as ``task`` are kept); a chat record is ``{"messages": [...]}``."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        if set(record) != {"messages"}:
            return f'a chat record has only the key "messages", got keys {sorted(record)}'
        if not isinstance(record["messages"], list):
            return '"messages" must be a list of {"role", "content"} objects'
        try:
            check_messages(record["messages"])
        except ValueError as err:
            return str(err)
        return None
    missing = [k for k in ("instruction", "input", "output") if k not in record]
    if missing:
        return f'expected "messages" or the keys instruction, input, output; missing {missing}'
    wrong = [k for k in ("instruction", "input", "output") if not isinstance(record[k], str)]
    if wrong:
        return f"{wrong[0]!r} must be a string, got {type(record[wrong[0]]).__name__}"
    return None


def to_jsonl(records: Iterable[dict[str, Any]], path: str | Path,
             check: Callable[[Any], str | None] | None = None) -> Path:
    """Write ``records`` one JSON object a line (UTF-8); ValueError naming the record index of the first bad
    record, before anything is written. ``check(record)`` says what is wrong with a record, or None
    (default: an instruction or chat record). Returns the path."""
    check = check or _record_problem
    records = list(records)
    for i, record in enumerate(records):
        problem = check(record)
        if problem:
            raise ValueError(f"record {i}: {problem}")
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path, check: Callable[[Any], str | None] | None = None) -> list[dict[str, Any]]:
    """The records of a JSONL file written by ``to_jsonl`` (blank lines skipped); ValueError
    ``"{path} line {n}: {what is wrong}"`` on the first line that is not a valid record (``check`` as in
    ``to_jsonl``)."""
    check = check or _record_problem
    records = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n}: not valid JSON ({err.msg} at column {err.colno})") from None
        problem = check(record)
        if problem:
            raise ValueError(f"{path} line {n}: {problem}")
        records.append(record)
    return records
