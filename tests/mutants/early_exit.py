"""Mutants of project 27 (each a variant of ``impl.early_exit.fast``'s check contracts): the skipped
layers' K/V left empty, the confidence compared with the wrong sign, every token exiting at the first
layer checked whatever its confidence, and the skipped layers' K/V computed from the embedding instead
of the exit state."""

from __future__ import annotations

from unittest.mock import patch

from impl.early_exit import fast
from impl.gpt.model import GPT


def skipped_kv_left_empty(*args, **kwargs):
    """The exit is taken but the layers above it get no K/V: their cache slots stay zero."""
    with patch.object(fast.SkippedKV, "fill", lambda self, cache, first, h: None):
        return fast.trace(*args, **kwargs)


def confidence_wrong_sign(*args, **kwargs):
    """Exits while the confidence is at or BELOW the threshold."""
    with patch("impl.early_exit.fast.should_exit", lambda c, threshold: c <= threshold):
        return fast.trace(*args, **kwargs)


def exits_at_first_layer(*args, **kwargs):
    """Every token leaves at the first layer checked, whatever its confidence."""
    with patch("impl.early_exit.fast.should_exit", lambda c, threshold: True):
        return fast.trace(*args, **kwargs)


def _greedy(trace_fn, *args, **kwargs):
    out = trace_fn(*args, **kwargs)
    return {"tokens": out.tokens, "logits": out.logits}


def confidence_wrong_sign_greedy(*args, **kwargs):
    """``confidence_wrong_sign`` through the never-exit check's contract."""
    return _greedy(confidence_wrong_sign, *args, **kwargs)


def exits_at_first_layer_greedy(*args, **kwargs):
    """``exits_at_first_layer`` through the never-exit check's contract."""
    return _greedy(exits_at_first_layer, *args, **kwargs)


def skipped_kv_from_embedding(*args, **kwargs):
    """Fills the skipped layers' K/V from the token's embedding (the state before block 1), not from the
    exit state copied up."""
    embed, fill = GPT.embed, fast.SkippedKV.fill
    seen: dict[str, object] = {}

    def remembered_embed(model, idx, position_ids):
        seen["x"] = embed(model, idx, position_ids)
        return seen["x"]

    with patch.object(GPT, "embed", remembered_embed), \
         patch.object(fast.SkippedKV, "fill", lambda self, cache, first, h: fill(self, cache, first, seen["x"])):
        return fast.trace(*args, **kwargs)
