"""Which part of a conversation to send: the longest recent history that fits the model's context window.

A chat grows one turn at a time and the model's window does not, so sooner or later the whole history no
longer fits. The rule here: the system prompt always stays (it sets the assistant's behaviour), the new user
message always goes (it is what the user asked), and whole past turns are dropped oldest first until the
rest fits. A turn is a user message and the replies after it, so an answer never loses its question.

Whether a prompt fits is a predicate, not a token count, because only the server knows its tokenizer and
its rule (``prompt + max_tokens`` against the window, or the prompt alone): the UI asks the server itself
and treats its "prompt too long" answer as "does not fit" (``impl/ui/app.py``). Tests pass a predicate that
counts tokens with a real tokenizer. Nothing here imports gradio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def turn_starts(history: Sequence[Message]) -> list[int]:
    """Indices in ``history`` where a turn begins (a user message), oldest first. Leading replies with no
    question before them (a history that was itself trimmed elsewhere) form no turn and go first."""
    return [i for i, m in enumerate(history) if m["role"] == "user"]


def candidate_prompts(system: str, history: Sequence[Message], user: str) -> Iterator[list[Message]]:
    """The prompts to try, longest first: ``[system?] + history[start:] + [user]`` for every turn start from
    the oldest to none at all. An empty (or blank) ``system`` sends no system message. The last candidate,
    system and user message alone, is always yielded."""
    head = [{"role": "system", "content": system}] if system.strip() else []
    tail = [{"role": "user", "content": user}]
    for start in turn_starts(history):
        yield head + [dict(m) for m in history[start:]] + tail
    yield head + tail


def trim_history(system: str, history: Sequence[Message], user: str,
                 fits: Callable[[list[Message]], bool]) -> list[Message]:
    """The longest candidate prompt (``candidate_prompts``) for which ``fits(messages)`` is true; when not even
    the system prompt and the user message fit, those two alone, so the server's refusal reaches the user
    instead of a silently emptied message. ``fits`` must be monotone: a prompt that fits still fits with its
    oldest turn removed."""
    candidate: list[Message] = []
    for candidate in candidate_prompts(system, history, user):
        if fits(candidate):
            return candidate
    return candidate
