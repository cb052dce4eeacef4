"""Supervised fine-tuning building blocks (project 4): prompt templates and the generated instruction set.

    from impl.sft import make_tasks, split, render_chat, tokenize_chat, as_messages
    train, evaluation = split(make_tasks(5000, seed=0), eval_fraction=0.1, seed=0)
    ids, labels = tokenize_chat(tokenizer, as_messages(train[0]))   # labels -100 outside the answer
"""

from impl.sft.tasks import (
    REFUSAL,
    TASK_KINDS,
    as_messages,
    exact_match,
    make_tasks,
    read_jsonl,
    split,
    to_jsonl,
)
from impl.sft.templates import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    parse_chat,
    render_alpaca,
    render_chat,
    tokenize_chat,
)

__all__ = [
    "IGNORE_INDEX",
    "REFUSAL",
    "SPECIAL_TOKENS",
    "TASK_KINDS",
    "as_messages",
    "exact_match",
    "make_tasks",
    "parse_chat",
    "read_jsonl",
    "render_alpaca",
    "render_chat",
    "split",
    "to_jsonl",
    "tokenize_chat",
]
