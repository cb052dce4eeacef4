"""Cases for project 30: conversations to trim to a token budget, counted with a real chat BPE.

A case is ``trim_history``'s arguments: a system prompt (maybe empty), a history of whole and partial turns
(a stopped answer, a failed turn that left only the question), the new user message and ``fits``: the
rendered prompt (``impl.sft.templates.render_chat`` with the generation prompt, as the server renders it)
is at most ``budget`` tokens of the tiny chat model's BPE (``impl.serving.tiny``)."""

from __future__ import annotations

from functools import cache
from typing import Any

from hypothesis import strategies as st

from harness.cases import Cases
from impl.sft.templates import render_chat

WORDS = ("to", "be", "or", "not", "the", "question", "hello", "how", "are", "you", "fine", "Paris", "17", "25",
         "lemon", "zebra", "apple", "?", "!", ",")


@cache
def _tokenizer():
    from impl.serving.tiny import tiny_chat_model

    return tiny_chat_model(n_layer=1, n_embd=8)[1]


def n_tokens(messages: list[dict[str, str]]) -> int:
    """Tokens of the prompt the server builds from ``messages``."""
    return len(_tokenizer().encode(render_chat(messages, add_generation_prompt=True), allowed_special="all"))


class TokenBudget:
    """``fits(messages)``: the prompt is at most ``budget`` tokens (monotone: fewer turns, fewer tokens)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, messages: list[dict[str, str]]) -> bool:
        return n_tokens(messages) <= self.budget

    def __repr__(self) -> str:
        return f"TokenBudget({self.budget})"


def conversation(system: str, turns: list[tuple[str, ...]], user: str, budget: int,
                 id: str | None = None) -> dict[str, Any]:
    """A case from turns written as tuples: ``(question, answer, ...)``; ``(question,)`` is a turn whose
    answer never came."""
    history = [{"role": "user" if i == 0 else "assistant", "content": text}
               for turn in turns for i, text in enumerate(turn)]
    case = {"system": system, "history": history, "user": user, "fits": TokenBudget(budget)}
    return case | ({"id": id} if id else {})


SYSTEM = "You are a helpful assistant."
TURNS = [("Add the two numbers.\n17 25", "42"), ("Reverse the letters.\nlemon", "nomel"),
         ("How are you?", "I am fine, thank you."), ("What is the capital of France?", "Paris.")]

conversations = Cases(
    edge=[
        conversation(SYSTEM, TURNS, "And the question?", 10_000, id="everything-fits"),
        conversation(SYSTEM, TURNS, "And the question?", 100, id="oldest-turns-go"),
        conversation(SYSTEM, TURNS, "And the question?", 145, id="a-turn-goes-whole"),
        conversation("", TURNS, "And the question?", 70, id="no-system-prompt"),
        conversation(SYSTEM, TURNS, "And the question?", 50, id="only-system-and-question-fit"),
        conversation(SYSTEM, TURNS, "And the question?", 3, id="nothing-fits"),
        conversation(SYSTEM, [("Hello",), ("Hello again", "Hi", "there"), ("Paris?", "Paris.")], "Bye", 75,
                     id="unanswered-and-split-answers"),
        conversation(SYSTEM, [], "First message", 40, id="first-message"),
    ],
    strategy=st.builds(
        conversation,
        system=st.sampled_from(["", SYSTEM, "Be concise."]),
        turns=st.lists(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
                                min_size=1, max_size=3).map(tuple), max_size=8),
        user=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join),
        budget=st.integers(1, 160),
    ),
)


def keeps_newest_turns_that_fit(fn, system, history, user, fits) -> None:
    """The prompt is the system message (if any), then whole recent turns, then the new message; it fits
    whenever the system message and the new message alone fit; one more (older) turn would not fit."""
    got = fn(system=system, history=history, user=user, fits=fits)
    head = [{"role": "system", "content": system}] if system.strip() else []
    tail = [{"role": "user", "content": user}]
    assert got[: len(head)] == head, f"the system prompt is not first and intact: {got[:1]}"
    assert got[len(head):][-1:] == tail, f"the new user message is not last: {got[-1:]}"
    kept = got[len(head): -1]
    starts = [i for i, m in enumerate(history) if m["role"] == "user"] + [len(history)]
    assert any(kept == history[s:] for s in starts), \
        f"the history sent ({len(kept)} messages) is not the newest whole turns of the conversation"
    if fits(head + tail):
        assert fits(got), f"the prompt does not fit the budget ({n_tokens(got)} tokens > {fits})"
        older = [s for s in starts if s < len(history) - len(kept)]
        if older:
            assert not fits(head + history[older[-1]:] + tail), \
                "a turn that fits the budget was dropped (the prompt could hold one more)"
