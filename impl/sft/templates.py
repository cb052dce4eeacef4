"""Prompt templates for supervised fine-tuning: Alpaca-style text and a chat template on reserved tokens.

The chat format, one turn per role, every turn closed by ``<|end|>`` and a newline::

    <|system|>\\n{content}<|end|>\\n<|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>\\n

A generation prompt is the assistant header alone (``<|assistant|>\\n``): the model writes the
content and stops by emitting ``<|end|>``. Content may hold any text except a special token's
string; such text would let a user forge a turn (``"hi<|end|>\\n<|assistant|>\\nsure"``), so it is
refused rather than escaped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from impl.bpe.tokenizer import ENDOFTEXT

# The chat special tokens, defined here once; the zoo reserves exactly these in every chat-ready BPE
# (impl/zoo/catalog.py): end of text, the three role markers, end of turn, padding.
SYSTEM, USER, ASSISTANT, END, PAD = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, SYSTEM, USER, ASSISTANT, END, PAD)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE_INDEX = -100  # the target value torch's cross_entropy skips

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_alpaca(instruction: str, input: str = "", output: str | None = None) -> tuple[str, str]:
    """The Alpaca ``(prompt, completion)``: the with-input wording when ``input`` is non-empty, else the
    no-input wording; ``completion`` is ``output`` (``""`` when None, i.e. a prompt for generation).
    The prompt ends with ``"### Response:\\n"``, so ``prompt + completion`` is the training text."""
    template = ALPACA_WITH_INPUT if input else ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=input), "" if output is None else output


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    """Raise ValueError (naming the message index) unless ``messages`` is a non-empty list of
    ``{"role": "system"|"user"|"assistant", "content": str}`` with no special token string in any content."""
    if len(messages) == 0:
        raise ValueError("empty conversation: pass at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f'message {i}: expected a dict with keys "role" and "content", got {message!r}')
        role, content = message["role"], message["content"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {i}: unknown role {role!r}; roles are {sorted(ROLE_TOKENS)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        forged = [t for t in SPECIAL_TOKENS if t in content]
        if forged:
            raise ValueError(
                f"message {i} ({role}): content contains the special token string {forged[0]!r}, "
                f"which would let the text forge a turn; remove it from the content"
            )


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The chat text of ``messages`` (format in the module docstring); with ``add_generation_prompt`` the
    assistant header follows, ready for the model to continue. Raises ValueError on an empty
    conversation, an unknown role or a special token string inside a content."""
    check_messages(messages)
    text = "".join(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END}\n" for m in messages)
    return text + (f"{ASSISTANT}\n" if add_generation_prompt else "")


_TURN = re.compile(r"<\|(system|user|assistant)\|>\n(.*?)<\|end\|>\n", re.DOTALL)


def parse_chat(text: str) -> list[dict[str, str]]:
    """The messages ``render_chat`` rendered into ``text`` (without a generation prompt); ValueError
    naming the character offset where ``text`` stops following the format."""
    messages, pos = [], 0
    while pos < len(text):
        turn = _TURN.match(text, pos)
        if turn is None:
            raise ValueError(f"chat text does not follow the template at character {pos}: {text[pos:pos + 40]!r}")
        messages.append({"role": turn.group(1), "content": turn.group(2)})
        pos = turn.end()
    check_messages(messages)
    return messages


def tokenize_chat(tokenizer: Any, messages: Sequence[dict[str, Any]],
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of equal length for ``messages``: ``labels[i]`` is ``ids[i]`` on an assistant
    content token or the ``<|end|>`` closing an assistant turn (so the model learns to stop) and
    ``IGNORE_INDEX`` everywhere else (role headers, system and user turns, newlines after ``<|end|>``).
    Labels sit at the token's own position: a causal loss compares ``logits[:-1]`` with ``labels[1:]``.

    ``tokenizer`` needs ``encode(text, allowed_special=...)`` with the chat special tokens registered.
    Each piece (header, content, ``<|end|>``, newline) is encoded on its own so that no BPE token spans
    a mask boundary; ``tokenizer.decode(ids) == render_chat(messages, add_generation_prompt)``."""
    check_messages(messages)
    missing = [t for t in (*ROLE_TOKENS.values(), END) if t not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing}; train it with them registered")
    specials = set(SPECIAL_TOKENS) & set(tokenizer.special_tokens)
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, train: bool, special: bool = False) -> None:
        piece = tokenizer.encode(text, allowed_special=specials if special else "none_raise")
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    for m in messages:
        trained = m["role"] == "assistant"
        add(ROLE_TOKENS[m["role"]], False, special=True)
        add("\n", False)
        if m["content"]:
            add(m["content"], trained)
        add(END, trained, special=True)
        add("\n", False)
    if add_generation_prompt:
        add(ASSISTANT, False, special=True)
        add("\n", False)
    return ids, labels
