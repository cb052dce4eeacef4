"""Micro-batch schedules as explicit per-rank action lists: GPipe and 1F1B (PipeDream-flush).

A schedule for ``p`` stages and ``m`` micro-batches is ``p`` lists of ``Action``s, one per rank, in the order
that rank computes them. Communication is implied by the actions, so a schedule cannot forget a send:
- ``F(mb)`` on rank r > 0 first receives mb's activation from rank r - 1; on rank r < p - 1 it then sends its
  output to rank r + 1 (the last rank computes the loss instead);
- ``B(mb)`` on rank r < p - 1 first receives the gradient of mb's output from rank r + 1; on rank r > 0 it
  then sends the gradient of its input to rank r - 1.

GPipe (Huang et al., 2019): every rank runs all m forwards, then all m backwards (in reverse order, like
autograd would). Activations of all m micro-batches are alive at once on every rank.

1F1B (PipeDream-flush, Narayanan et al., 2021): rank r runs ``p - r - 1`` warm-up forwards, then alternates
one forward and one backward, then drains the remaining backwards. Same bubble as GPipe, but rank r holds at
most ``p - r`` micro-batches' activations, not m.

``simulate`` executes a schedule with fixed costs per forward / backward (sends free, asynchronous; receives
block), the way ``runtime`` executes it on real ranks: it finds deadlocks and gives the ideal timeline, whose
bubble is ``(p - 1) / (m + p - 1)`` for both schedules when each stage costs the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["F", "B"]


@dataclass(frozen=True)
class Action:
    """One compute step of one rank: forward ``F`` or backward ``B`` of micro-batch ``mb``."""

    kind: Kind
    mb: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}"


Schedule = list[list[Action]]  # [rank][step]


def _check_sizes(n_stages: int, n_micro: int) -> None:
    if n_stages < 1 or n_micro < 1:
        raise ValueError(f"a pipeline needs at least 1 stage and 1 micro-batch, got {n_stages} and {n_micro}")


def gpipe(n_stages: int, n_micro: int) -> Schedule:
    """GPipe: on every rank, forwards of micro-batches 0..m-1, then backwards m-1..0."""
    _check_sizes(n_stages, n_micro)
    return [[Action("F", i) for i in range(n_micro)] + [Action("B", i) for i in reversed(range(n_micro))]
            for _ in range(n_stages)]


def one_f_one_b(n_stages: int, n_micro: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r runs min(p - r - 1, m) warm-up forwards, then one forward and one
    backward in turn, then the remaining backwards; forwards and backwards each in micro-batch order."""
    _check_sizes(n_stages, n_micro)
    schedule = []
    for rank in range(n_stages):
        warmup = min(n_stages - rank - 1, n_micro)
        actions = [Action("F", i) for i in range(warmup)]
        next_f, next_b = warmup, 0
        while next_f < n_micro:  # steady state: the forward that fills the pipe, then the oldest backward
            actions += [Action("F", next_f), Action("B", next_b)]
            next_f, next_b = next_f + 1, next_b + 1
        actions += [Action("B", i) for i in range(next_b, n_micro)]  # cool-down
        schedule.append(actions)
    return schedule


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def max_in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose forward has run and whose backward has not, at any point of one rank's list:
    how many micro-batches' activations that rank holds at once."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class Event:
    """A compute event of one rank on a timeline: action, start and end (seconds or cost units)."""

    rank: int
    kind: Kind
    mb: int
    start: float
    end: float


class Deadlock(RuntimeError):
    """The schedule waits forever: every rank's next action needs something no rank will produce."""


def simulate(schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 1.0) -> list[Event]:
    """Execute ``schedule`` with fixed costs: each rank runs its list in order, an action starts when its rank is
    free and its input exists (F: the previous stage's F of that mb; B: the next stage's B of that mb, or this
    rank's own F on the last stage). Returns every compute event; raises ``Deadlock`` when no rank can go on,
    ``ValueError`` when a rank repeats an action or a B precedes its own F on that rank."""
    p = len(schedule)
    done: dict[tuple[int, Kind, int], float] = {}  # (rank, kind, mb) -> end time
    pos, free = [0] * p, [0.0] * p
    events: list[Event] = []
    for rank, actions in enumerate(schedule):
        if len(set(actions)) != len(actions):
            raise ValueError(f"rank {rank} repeats an action: {actions}")
        seen_f: set[int] = set()
        for a in actions:
            if a.kind == "F":
                seen_f.add(a.mb)
            elif a.mb not in seen_f:
                raise ValueError(f"rank {rank} runs B{a.mb} before its own F{a.mb}")
    while any(pos[r] < len(schedule[r]) for r in range(p)):
        progressed = False
        for rank in range(p):
            if pos[rank] >= len(schedule[rank]):
                continue
            a = schedule[rank][pos[rank]]
            if a.kind == "F":
                need = (rank - 1, "F", a.mb) if rank > 0 else None
            else:
                need = (rank + 1, "B", a.mb) if rank < p - 1 else (rank, "F", a.mb)
            if need is not None and need not in done:
                continue
            start = max(free[rank], done[need] if need is not None else 0.0)
            end = start + (forward_cost if a.kind == "F" else backward_cost)
            done[(rank, a.kind, a.mb)] = end
            free[rank] = end
            events.append(Event(rank, a.kind, a.mb, start, end))
            pos[rank] += 1
            progressed = True
        if not progressed:
            waiting = {r: schedule[r][pos[r]] for r in range(p) if pos[r] < len(schedule[r])}
            raise Deadlock(f"no rank can proceed; next actions {waiting}")
    return events


def bubble_fraction(events: list[Event]) -> float:
    """1 - (mean over ranks of busy time) / (step span): busy = the sum of a rank's compute event durations,
    span = last end - first start over all ranks (the step's wall time). Idle time inside the span, waiting
    for an activation or a gradient, is the bubble."""
    ranks = sorted({e.rank for e in events})
    span = max(e.end for e in events) - min(e.start for e in events)
    busy = [sum(e.end - e.start for e in events if e.rank == r) for r in ranks]
    return 1.0 - sum(busy) / len(ranks) / span


def ideal_bubble(n_stages: int, n_micro: int) -> float:
    """The textbook bubble fraction of GPipe and 1F1B with equal stages: (p - 1) / (m + p - 1)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)
