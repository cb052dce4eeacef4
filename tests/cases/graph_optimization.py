"""Cases for project 26: small random GPTs, their token ids, whether the ONNX graph was traced at the
case's own shape (fixed) or at another one with symbolic axes (dynamic), and which exporter wrote it.

The dynamo exporter (torch.export + onnxscript) takes 10-20 s per graph even for these tiny models, the
legacy TorchScript tracer under half a second. So one model (``DYNAMO``: peaked, seed 3) goes through the
dynamo exporter, its prefill and decode graphs exported once and shared by the prefill, decode and greedy
checks; every other case, the hypothesis examples and the mutants use the TorchScript exporter. The
benchmarks run bpe-base through the dynamo graphs (and fail if their logits or tokens differ from eager).
Hypothesis draws weights from a few seeds and varies the shapes: one graph serves many shapes."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from tests.cases.gpt import random_gpt

VOCAB, BLOCK = 61, 48


TS, DYNAMO = "torchscript", "dynamo"


def _model(seed: int, n_layer: int, n_head: int, head_dim: int, bias: bool = True, peaked: bool = False,
           mlp_gain: float = 1.0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config, state = random_gpt(seed, n_layer, n_head, head_dim, VOCAB, BLOCK, bias, peaked)
    if mlp_gain != 1.0:  # MLP inputs of order 1: GELU's curvature (tanh vs erf) then shows in the logits
        state = {k: v * mlp_gain if k.endswith("mlp.c_fc.weight") else v for k, v in state.items()}
    return config, state


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(1000 + seed))


def prefill_case(seed: int, batch: int, length: int, dynamic: bool, exporter: str = TS, n_layer: int = 2,
                 n_head: int = 2, head_dim: int = 8, bias: bool = True, peaked: bool = False,
                 id: str | None = None) -> dict[str, Any]:
    """A random GPT, ids (batch, length), and ``dynamic``: the ONNX side traces at 2 x 5 with symbolic axes
    (True) or at exactly (batch, length) (False)."""
    config, state = _model(seed, n_layer, n_head, head_dim, bias, peaked)
    case = {"config": config, "state": state, "idx": _ids(seed, batch, length), "dynamic": dynamic,
            "exporter": exporter, "dtype": torch.float32}
    return case | ({"id": id} if id else {})


prefill = Cases(
    edge=[
        prefill_case(0, 2, 5, dynamic=False, id="fixed-2x5"),
        prefill_case(0, 1, 1, dynamic=True, id="dynamic-1x1"),
        prefill_case(0, 3, 17, dynamic=True, id="dynamic-3x17"),
        prefill_case(0, 1, BLOCK, dynamic=True, id="dynamic-full-context"),
        prefill_case(1, 1, 9, dynamic=False, n_layer=3, n_head=4, head_dim=4, bias=False, id="fixed-no-bias"),
        prefill_case(3, 3, 11, dynamic=True, exporter=DYNAMO, peaked=True, id="dynamo-dynamic-3x11"),
        prefill_case(3, 1, 1, dynamic=True, exporter=DYNAMO, peaked=True, id="dynamo-dynamic-1x1"),
    ],
    strategy=st.builds(prefill_case, seed=st.sampled_from([0, 2]), batch=st.integers(1, 4),
                       length=st.integers(1, BLOCK), dynamic=st.just(True)),
)


def decode_case(seed: int, batch: int, past: int, exporter: str = TS, n_layer: int = 2, n_head: int = 2,
                head_dim: int = 8, bias: bool = True, peaked: bool = False, id: str | None = None) -> dict[str, Any]:
    """A random GPT, a prompt (batch, past) to prefill and the next token (batch, 1) for one decode step."""
    config, state = _model(seed, n_layer, n_head, head_dim, bias, peaked)
    ids = _ids(seed, batch, past + 1)
    case = {"config": config, "state": state, "prompt": ids[:, :past], "token": ids[:, past:], "exporter": exporter,
            "dtype": torch.float32}
    return case | ({"id": id} if id else {})


decode = Cases(
    edge=[
        decode_case(0, 1, 1, id="after-1-token"),
        decode_case(0, 2, 6, id="batch2-after-6"),
        decode_case(0, 3, BLOCK - 1, id="last-slot"),
        decode_case(1, 1, 12, n_layer=3, n_head=4, head_dim=4, bias=False, id="no-bias"),
        decode_case(3, 2, 9, exporter=DYNAMO, peaked=True, id="dynamo-batch2-after-9"),
    ],
    strategy=st.builds(decode_case, seed=st.sampled_from([0, 2]), batch=st.integers(1, 3),
                       past=st.integers(1, BLOCK - 1)),
)


def greedy_case(seed: int, batch: int, length: int, max_new_tokens: int, exporter: str = TS, n_layer: int = 2,
                n_head: int = 2, head_dim: int = 8, id: str | None = None) -> dict[str, Any]:
    """A peaked random GPT (no near-ties: greedy tokens are decided by the context, not by rounding), a prompt
    (batch, length) and how many tokens to generate."""
    config, state = _model(seed, n_layer, n_head, head_dim, peaked=True)
    case = {"config": config, "state": state, "prompt": _ids(seed, batch, length), "max_new_tokens": max_new_tokens,
            "exporter": exporter}
    return case | ({"id": id} if id else {})


greedy = Cases(
    edge=[
        greedy_case(3, 1, 1, 1, id="one-token-prompt-one-new"),
        greedy_case(3, 1, 4, 20, id="batch1-20-new"),
        greedy_case(3, 3, 7, 12, id="batch3"),
        greedy_case(4, 2, 10, BLOCK - 10, n_layer=3, n_head=4, head_dim=4, id="to-the-end-of-context"),
        greedy_case(3, 2, 5, 16, exporter=DYNAMO, id="dynamo-batch2"),
    ],
    strategy=st.builds(greedy_case, seed=st.sampled_from([3, 4]), batch=st.integers(1, 3), length=st.integers(1, 16),
                       max_new_tokens=st.integers(1, 24)),
)


def jax_case(seed: int, batch: int, length: int, n_layer: int = 2, n_head: int = 2, head_dim: int = 8,
             bias: bool = True, id: str | None = None) -> dict[str, Any]:
    """A peaked random GPT (logits of order 10) whose MLP inputs are of order 1 (c_fc weights x 20), so that
    GELU's exact form shows in the logits, and ids (batch, length)."""
    config, state = _model(seed, n_layer, n_head, head_dim, bias, peaked=True, mlp_gain=20.0)
    case = {"config": config, "state": state, "idx": _ids(seed, batch, length), "dtype": torch.float32}
    return case | ({"id": id} if id else {})


jax_logits = Cases(
    edge=[
        jax_case(0, 1, 1, id="one-token"),
        jax_case(0, 2, 13, id="batch2"),
        jax_case(1, 1, BLOCK, n_layer=3, n_head=4, head_dim=4, bias=False, id="full-context-no-bias"),
    ],
    strategy=st.builds(jax_case, seed=st.integers(0, 2**16), batch=st.integers(1, 3), length=st.integers(1, BLOCK),
                       n_layer=st.integers(1, 3), n_head=st.integers(1, 4), head_dim=st.sampled_from([4, 8]),
                       bias=st.booleans()),
)
