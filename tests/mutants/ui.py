"""Mutants of the history trimming (project 30): each breaks one rule the property check must notice."""

from __future__ import annotations

from impl.ui.history import candidate_prompts, trim_history


def drops_system_prompt(system, history, user, fits):
    """Trims as it should, then leaves the system prompt out (the assistant forgets its instructions)."""
    got = trim_history(system, history, user, fits)
    return [m for m in got if m["role"] != "system"]


def keeps_oldest_turns(system, history, user, fits):
    """Keeps the oldest turns that fit and drops the newest: the model loses what was just said."""
    head = [{"role": "system", "content": system}] if system.strip() else []
    tail = [{"role": "user", "content": user}]
    starts = [i for i, m in enumerate(history) if m["role"] == "user"] + [len(history)]
    for end in reversed(starts):
        if fits(head + history[:end] + tail):
            return head + history[:end] + tail
    return head + tail


def one_turn_over_budget(system, history, user, fits):
    """Sends the candidate just before the first one that fits: one turn too many for the window."""
    candidates = list(candidate_prompts(system, history, user))
    for i, candidate in enumerate(candidates):
        if fits(candidate):
            return candidates[max(0, i - 1)]
    return candidates[-1]


def leaves_out_new_message(system, history, user, fits):
    """Trims the history but forgets to send what the user just typed."""
    return trim_history(system, history, user, fits)[:-1]


def drops_all_history(system, history, user, fits):
    """Always sends the system prompt and the new message alone: fits, but forgets the conversation."""
    return list(candidate_prompts(system, history, user))[-1]


def drops_single_messages(system, history, user, fits):
    """Drops message by message instead of whole turns: an answer can be sent without its question."""
    head = [{"role": "system", "content": system}] if system.strip() else []
    tail = [{"role": "user", "content": user}]
    for start in range(len(history) + 1):
        if fits(head + history[start:] + tail):
            return head + history[start:] + tail
    return head + tail
