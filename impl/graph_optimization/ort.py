"""ONNX Runtime over the exported graphs: sessions at each graph optimization level, the optimized
graphs saved and their nodes counted, and cached greedy generation with the K/V tensors passed
from one step's outputs to the next step's inputs.

ORT's levels (each includes the ones before; ``SessionOptions.graph_optimization_level``):

- ``disable_all``: the graph as exported, run node by node;
- ``basic``: semantics-preserving rewrites any execution provider can run: constant folding,
  redundant node elimination (Identity, Dropout, a Cast to the same type, unused outputs), and
  fusions into standard ONNX ops (Conv+BatchNorm, MatMul+Add into Gemm, ...);
- ``extended``: fusions into ORT's own contrib ops for the CPU / CUDA providers: LayerNorm and
  SkipLayerNorm, BiasGelu / FastGelu, FusedMatMul (a transpose or scale absorbed into the matmul),
  attention fusion where the pattern matches;
- ``all``: plus layout optimizations (NCHWc blocked layouts for convolutions: a transformer has none).

Node counts per level are measured (``level_report``); the README says what each removed here.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from impl.gpt.model import GPT
from impl.graph_optimization.export import cached_graph, kv_names

LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

GraphMaker = Callable[..., Path]  # (model, kind, dynamic=, batch=, length=, past=, exporter=) -> .onnx path


def session(path: str | Path, level: str = "all", threads: int = 1,
            optimized_path: str | Path | None = None) -> ort.InferenceSession:
    """A CPU session on the graph at ``path`` optimized at ``level`` (a key of ``LEVELS``), running on
    ``threads`` intra-op threads; ``optimized_path``: where ORT writes the graph it optimized."""
    if level not in LEVELS:
        raise ValueError(f"unknown optimization level {level!r}; known: {', '.join(LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: the optimizer's notes are not failures
    if optimized_path is not None:
        Path(optimized_path).parent.mkdir(parents=True, exist_ok=True)
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=16)
def cached_session(path: str, level: str = "all", threads: int = 1) -> ort.InferenceSession:
    """``session`` kept per (graph file, level, threads): a check builds each one once."""
    return session(path, level, threads)


def node_counts(path: str | Path) -> collections.Counter[str]:
    """Nodes of the ONNX graph at ``path`` by op type (contrib ops as ``domain:op``)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                               for n in graph.node)


def level_report(path: str | Path, out_dir: str | Path, threads: int = 1) -> dict[str, dict[str, Any]]:
    """Optimize the graph at ``path`` at every level, save each result under ``out_dir`` as
    ``<stem>.<level>.onnx``; per level the ``total`` node count, counts ``by_op`` and the file. The
    ``exported`` entry is the graph as the exporter wrote it."""
    path, out_dir = Path(path), Path(out_dir)
    counts = node_counts(path)
    report = {"exported": {"total": sum(counts.values()), "by_op": dict(sorted(counts.items())), "file": str(path)}}
    for level in LEVELS:
        saved = out_dir / f"{path.stem}.{level}.onnx"
        session(path, level, threads, optimized_path=saved)
        counts = node_counts(saved)
        report[level] = {"total": sum(counts.values()), "by_op": dict(sorted(counts.items())), "file": str(saved)}
    return report


def step_positions(past: int, batch: int, length: int) -> np.ndarray:
    """Position ids (batch, length) of ``length`` new tokens after ``past`` cached ones: past, past + 1, ..."""
    return np.broadcast_to(np.arange(past, past + length, dtype=np.int64), (batch, length)).copy()


class OrtGPT:
    """Prefill and decode-step sessions of one model; K/V travel as arrays between them."""

    def __init__(self, prefill: ort.InferenceSession, decode: ort.InferenceSession | None, n_layer: int):
        self.prefill_session, self.decode_session = prefill, decode
        self.past_names = kv_names("past", n_layer)

    @classmethod
    def from_model(cls, model: GPT, level: str = "all", threads: int = 1, graphs: GraphMaker = cached_graph,
                   exporter: str = "dynamo") -> OrtGPT:
        """Export (or reuse) ``model``'s dynamic prefill and decode graphs; sessions at ``level``."""
        prefill = cached_session(str(graphs(model, "prefill", exporter=exporter)), level, threads)
        decode = cached_session(str(graphs(model, "decode", exporter=exporter)), level, threads)
        return cls(prefill, decode, model.config.n_layer)

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) int64 -> logits (B, T, V), [key_0, value_0, ...] each (B, nh, T, hs)."""
        logits, *kv = self.prefill_session.run(None, {"ids": ids})
        return logits, kv

    def decode(self, ids: np.ndarray, kv: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """ids (B, T) after the cached ``kv`` (B, nh, P, hs each) -> logits (B, T, V), present K/V
        (B, nh, P + T, hs); the positions follow the past length."""
        B, T = ids.shape
        feeds = {"ids": ids, "positions": step_positions(kv[0].shape[2], B, T)}
        feeds |= dict(zip(self.past_names, kv, strict=True))
        logits, *present = self.decode_session.run(None, feeds)
        return logits, present

    def greedy(self, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Prompt (B, T) followed by ``max_new_tokens`` greedy ids: (B, T + max_new_tokens)."""
        logits, kv = self.prefill(prompt)
        out = [prompt]
        for step in range(max_new_tokens):
            next_id = logits[:, -1, :].argmax(axis=-1)[:, None].astype(np.int64)  # (B, 1)
            out.append(next_id)
            if step + 1 == max_new_tokens:
                break
            logits, kv = self.decode(next_id, kv)
        return np.concatenate(out, axis=1)


# ------------------------------------------------------------------ the ORT sides of the checks


def prefill_outputs(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor,
                    dynamic: bool = True, exporter: str = "dynamo", level: str = "all",
                    graphs: GraphMaker = cached_graph) -> dict[str, Any]:
    """``eager_prefill``'s outputs through ORT at ``level``: ``logits`` (B, T, V), ``keys`` / ``values`` per
    layer. ``dynamic``: the graph was traced at another shape (batch 2 x 5) with symbolic axes; else at
    exactly ``idx``'s shape. ``exporter``: "dynamo" or "torchscript" (``export.export_graph``)."""
    model = GPT.from_state(config, state)
    B, T = idx.shape
    shape = {} if dynamic else {"dynamic": False, "batch": B, "length": T}
    path = graphs(model, "prefill", exporter=exporter, **shape)
    logits, kv = OrtGPT(cached_session(str(path), level), None, model.config.n_layer).prefill(idx.numpy())
    return {"logits": torch.from_numpy(logits), "keys": [torch.from_numpy(k) for k in kv[0::2]],
            "values": [torch.from_numpy(v) for v in kv[1::2]]}


def _level(level: str) -> Callable[..., dict[str, Any]]:
    def at_level(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor,
                 dynamic: bool = True, exporter: str = "dynamo") -> dict[str, Any]:
        return prefill_outputs(config, state, idx, dynamic, exporter, level)

    at_level.__doc__ = f"``prefill_outputs`` with the graph optimized at ORT level {level!r}."
    at_level.__name__ = f"prefill_{level}"
    return at_level


prefill_disable_all, prefill_basic = _level("disable_all"), _level("basic")
prefill_extended, prefill_all = _level("extended"), _level("all")


def decode_step(config: dict[str, Any], state: dict[str, torch.Tensor], prompt: torch.Tensor, token: torch.Tensor,
                exporter: str = "dynamo", level: str = "all", graphs: GraphMaker = cached_graph) -> dict[str, Any]:
    """``eager_decode_step`` through ORT: the prefill graph on ``prompt`` (B, P), then the decode graph on
    ``token`` (B, 1) with the prefill's K/V: that step's ``logits`` (B, 1, V), ``keys`` / ``values``
    (B, nh, P + 1, hs) per layer."""
    runner = OrtGPT.from_model(GPT.from_state(config, state), level, graphs=graphs, exporter=exporter)
    _, kv = runner.prefill(prompt.numpy())
    logits, kv = runner.decode(token.numpy(), kv)
    return {"logits": torch.from_numpy(logits), "keys": [torch.from_numpy(k) for k in kv[0::2]],
            "values": [torch.from_numpy(v) for v in kv[1::2]]}


def decode_step_disable_all(config: dict[str, Any], state: dict[str, torch.Tensor], prompt: torch.Tensor,
                            token: torch.Tensor, exporter: str = "dynamo") -> dict[str, Any]:
    """``decode_step`` with both graphs unoptimized (ORT_DISABLE_ALL)."""
    return decode_step(config, state, prompt, token, exporter, "disable_all")


def greedy(config: dict[str, Any], state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int,
           exporter: str = "dynamo", level: str = "all", graphs: GraphMaker = cached_graph) -> torch.Tensor:
    """Same contract as ``impl.kv_cache.fast.greedy``: (B, T) prompt -> (B, T + max_new_tokens) ids, every
    forward through ORT (prefill graph once, then one decode-graph step per token)."""
    runner = OrtGPT.from_model(GPT.from_state(config, state), level, graphs=graphs, exporter=exporter)
    return torch.from_numpy(runner.greedy(prompt.numpy(), max_new_tokens))
