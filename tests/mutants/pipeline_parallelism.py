"""Mutants of project 24: a pipeline step that forgets the 1/m micro-batch loss scaling or the sum of the tied
embedding / LM head gradients; 1F1B schedules that run a backward before its forward, skip the warm-up
(everywhere, or on the first rank only: a deadlock with 3 or more stages), or keep GPipe's order."""

from __future__ import annotations

from unittest.mock import patch

from impl.pipeline_parallelism import runtime
from impl.pipeline_parallelism.schedules import Action, gpipe, one_f_one_b


def unscaled_micro_losses(stage, schedule, idx, targets, n_micro):
    """Each micro-batch's loss is not divided by m: gradients m times the full batch mean's."""
    share = runtime.micro_loss
    with patch.object(runtime, "micro_loss", lambda logits, t, m: share(logits, t, 1)):
        out = runtime.pipeline_step(stage, schedule, idx, targets, n_micro)
    out["losses"] = [v / n_micro for v in out["losses"]]  # report the losses right: only the gradients are wrong
    return out


def tied_grads_not_summed(stage, schedule, idx, targets, n_micro):
    """The first and last stage keep only their own use's gradient of the tied embedding / LM head."""
    with patch.object(runtime, "reduce_tied_grads", lambda stage: None):
        return runtime.pipeline_step(stage, schedule, idx, targets, n_micro)


def backward_first_in_steady_state(n_stages, n_micro):
    """1F1B with each steady-state pair run backward first: the last rank runs B0 before its F0."""
    out = []
    for actions in one_f_one_b(n_stages, n_micro):
        swapped, i = list(actions), 0
        while i + 1 < len(swapped):
            if swapped[i].kind == "F" and swapped[i + 1].kind == "B":
                swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
                i += 2
            else:
                i += 1
        out.append(swapped)
    return out


def no_warmup(n_stages, n_micro):
    """1F1B without warm-up on any rank: F0 B0 F1 B1 ...: valid, but the micro-batches no longer overlap."""
    return [[Action(k, i) for i in range(n_micro) for k in ("F", "B")] for _ in range(n_stages)]


def first_rank_skips_warmup(n_stages, n_micro):
    """1F1B whose first rank starts alternating at once: with 3+ stages rank 0 waits for a gradient that needs
    a forward rank 1 waits for (deadlock); with 2 the pipe never fills."""
    schedule = one_f_one_b(n_stages, n_micro)
    schedule[0] = [Action(k, i) for i in range(n_micro) for k in ("F", "B")]
    return schedule


def gpipe_order(n_stages, n_micro):
    """Called 1F1B, runs GPipe's order: all forwards first, so every rank holds all m activations."""
    return gpipe(n_stages, n_micro)


def drops_last_backward(n_stages, n_micro):
    """GPipe whose first rank never runs the last backward it owes (B0): its gradient is lost."""
    schedule = gpipe(n_stages, n_micro)
    schedule[0] = schedule[0][:-1]
    return schedule
