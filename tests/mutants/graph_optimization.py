"""Mutants of project 26: ONNX graphs exported from a broken wrapper (causal mask dropped, present keys and
values swapped, a decode step that attends to the new token only), a generation loop whose positions do not
count the cached tokens, and a JAX port with the exact (erf) GELU instead of GPT-2's tanh approximation.

Each broken graph is exported into its own temporary directory, never into the export cache the correct
graphs live in."""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any
from unittest.mock import patch

import jax

from impl.gpt import attention
from impl.graph_optimization import export, jax_gpt, ort

_TMP = tempfile.TemporaryDirectory(prefix="p26-mutants-")
_ATTEND = export.ExplicitKV.attend  # the correct method, kept before any patch replaces it
_count = 0


def _graphs_with(*patches: AbstractContextManager) -> ort.GraphMaker:
    """A graph maker that exports under ``patches`` to a fresh temporary file (never the cache)."""

    def graphs(model, kind, dynamic=True, batch=2, length=5, past=7, exporter="dynamo"):
        global _count
        _count += 1
        path = Path(_TMP.name) / f"{_count}-{kind}.onnx"
        with ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            return export.export_graph(model, path, kind, dynamic=dynamic, batch=batch, length=length, past=past,
                                       exporter=exporter)

    return graphs


def _non_causal(q, k, v, causal, key_valid=None):
    return export.explicit_attention(q, k, v, False, key_valid)


def _swapped_attend(self, layer, q, k, v, attend_fn, key_valid):
    y = _ATTEND(self, layer, q, k, v, attend_fn, key_valid)
    self.keys[-1], self.values[-1] = self.values[-1], self.keys[-1]  # the outputs wired the wrong way round
    return y


def _past_ignored_attend(self, layer, q, k, v, attend_fn, key_valid):
    _ATTEND(self, layer, q, k, v, attend_fn, key_valid)  # present K/V built as usual ...
    return export.call_attention(attend_fn, q, k, v, key_valid)  # ... but attention sees the new tokens only


def _no_mask():
    return _graphs_with(patch.dict(attention._BACKENDS, {"explicit": _non_causal}))


def _swapped():
    return _graphs_with(patch.object(export.ExplicitKV, "attend", _swapped_attend))


def _past_ignored():
    return _graphs_with(patch.object(export.ExplicitKV, "attend", _past_ignored_attend))


def _positions_from_zero() -> AbstractContextManager:
    original = ort.step_positions
    return patch.object(ort, "step_positions", lambda past, batch, length: original(0, batch, length))


# ------------------------------------------------------------------ prefill (subject: prefill_all)


def causal_mask_dropped(config, state, idx, dynamic=True, exporter="dynamo") -> dict[str, Any]:
    """The exported attention has no causal mask: every token sees the future."""
    return ort.prefill_outputs(config, state, idx, dynamic, exporter, "all", graphs=_no_mask())


def present_key_value_swapped(config, state, idx, dynamic=True, exporter="dynamo") -> dict[str, Any]:
    """``present.i.key`` carries the values and ``present.i.value`` the keys."""
    return ort.prefill_outputs(config, state, idx, dynamic, exporter, "all", graphs=_swapped())


# ------------------------------------------------------------------ decode step (subject: decode_all)


def decode_ignores_past(config, state, prompt, token, exporter="dynamo") -> dict[str, Any]:
    """The decode graph returns past + new K/V but attends over the new token's only."""
    return ort.decode_step(config, state, prompt, token, exporter, "all", graphs=_past_ignored())


def positions_not_offset(config, state, prompt, token, exporter="dynamo") -> dict[str, Any]:
    """The step's position ids start at 0 instead of at the number of cached tokens."""
    with _positions_from_zero():
        return ort.decode_step(config, state, prompt, token, exporter, "all")


# ------------------------------------------------------------------ greedy generation (subject: ort_greedy)


def greedy_ignores_past(config, state, prompt, max_new_tokens, exporter="dynamo"):
    """Greedy generation through a decode graph that attends over the new token only."""
    return ort.greedy(config, state, prompt, max_new_tokens, exporter, graphs=_past_ignored())


def greedy_positions_not_offset(config, state, prompt, max_new_tokens, exporter="dynamo"):
    """Greedy generation whose decode steps all sit at position 0."""
    with _positions_from_zero():
        return ort.greedy(config, state, prompt, max_new_tokens, exporter)


# ------------------------------------------------------------------ JAX (subject: jax)


def _erf_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def erf_gelu(config, state, idx):
    """The JAX port with the exact (erf) GELU: torch's ``nn.GELU()`` default, not GPT-2's tanh form."""
    return jax_gpt.logits(config, state, idx, activation=_erf_gelu)

