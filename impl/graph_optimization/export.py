"""The shared GPT as two ONNX graphs: prefill and one decode step, with the KV cache as explicit tensors.

- prefill: ``ids`` (B, T) -> ``logits`` (B, T, V), ``present.{i}.key`` / ``present.{i}.value`` (B, nh, T, hs);
- decode step: ``ids`` (B, T_new), ``positions`` (B, T_new), ``past.{i}.key`` / ``past.{i}.value``
  (B, nh, P, hs) -> ``logits`` (B, T_new, V), ``present.{i}.key`` / ``present.{i}.value`` (B, nh, P + T_new, hs).

No fork of the model: ``ExplicitKV`` is a cache object (the model's cache seam, ``impl/gpt/model.py``)
that concatenates the past it was given with each layer's new keys and values and keeps what it
attended over, so the traced graph takes the cache in and hands it out. The decode step takes its
positions as an input (``position_ids``): the graph never reads a Python ``cache.position``, which
would be baked into the trace as a constant.

Attention in the graphs is ``explicit`` (registered here): one matmul-softmax-matmul over all heads
with a bottom-right causal mask built from the shapes. The model's default ``sdpa`` backend branches
in Python on ``T == 1`` and ``T == S``: a trace with symbolic shapes would keep only one branch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.data.corpus import cache_dir
from impl.gpt.attention import causal_mask, register_attention
from impl.gpt.model import GPT, call_attention
from impl.kv_cache.fast import KVCache

OPSET = 18


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v over all heads at once, without shape branches:
    q (B, nh, T, hs), k, v (B, nh, S, hs) -> (B, nh, T, hs). No padding masks (``key_valid``)."""
    if key_valid is not None:
        raise ValueError("the exported graphs take unpadded batches only: no attention_mask / segment_ids")
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return F.softmax(scores, dim=-1) @ v


register_attention("explicit", explicit_attention)


class ExplicitKV:
    """The model's cache protocol over explicit tensors: ``past_keys`` / ``past_values`` (one
    (B, nh, P, hs) tensor per layer, or None for a prefill) in; ``keys`` / ``values`` (B, nh, P + T, hs)
    per layer, what each layer attended over, out."""

    def __init__(self, past_keys: list[torch.Tensor] | None = None, past_values: list[torch.Tensor] | None = None):
        self.past_keys, self.past_values = past_keys, past_values
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.position = 0 if past_keys is None else past_keys[0].shape[2]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: Any, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Append the new (B, nh, T, hs) keys/values to the past of ``layer``; attention over all."""
        if self.past_keys is not None:
            k = torch.cat([self.past_keys[layer], k], dim=2)  # (B, nh, P + T, hs)
            v = torch.cat([self.past_values[layer], v], dim=2)
        self.keys.append(k)
        self.values.append(v)
        return call_attention(attend_fn, q, k, v, key_valid)

    def advance(self, n_tokens: int) -> None:
        self.position += n_tokens


def exportable(model: GPT) -> GPT:
    """A copy of ``model`` (eval, fp32) on the ``explicit`` attention backend: same weights, same maths."""
    copied = copy.deepcopy(model).float().eval()
    copied.set_attention("explicit")
    return copied


def _interleave(keys: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t for kv in zip(keys, values, strict=True) for t in kv)


class PrefillGraph(nn.Module):
    """ids (B, T) -> (logits (B, T, V), key_0, value_0, key_1, ...), each (B, nh, T, hs)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = ExplicitKV()
        logits = self.model(ids, cache=cache)
        return (logits, *_interleave(cache.keys, cache.values))


class DecodeGraph(nn.Module):
    """ids (B, T), positions (B, T), past key_0, value_0, ... (B, nh, P, hs) -> (logits (B, T, V),
    present key_0, value_0, ... (B, nh, P + T, hs))."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = ExplicitKV(list(past[0::2]), list(past[1::2]))
        logits = self.model(ids, cache=cache, position_ids=positions)
        return (logits, *_interleave(cache.keys, cache.values))


def kv_names(prefix: str, n_layer: int) -> list[str]:
    """``prefix.0.key``, ``prefix.0.value``, ``prefix.1.key``, ...: the graphs' K/V tensor names."""
    return [f"{prefix}.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def _sample_inputs(model: GPT, kind: str, batch: int, length: int, past: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ids = torch.randint(V, (batch, length), generator=gen)
    if kind == "prefill":
        return (ids,)
    attn = model.blocks[0].attn
    positions = torch.arange(past, past + length).expand(batch, length).contiguous()
    kv = [torch.randn(batch, attn.n_head, past, attn.head_dim, generator=gen) for _ in range(2 * model.config.n_layer)]
    return (ids, positions, *kv)


def export_graph(model: GPT, path: str | Path, kind: str, *, dynamic: bool = True, batch: int = 2, length: int = 5,
                 past: int = 7, exporter: str = "dynamo", optimize: bool = True) -> Path:
    """Write ``model``'s ``kind`` graph ("prefill" or "decode") to ``path`` (ONNX, opset 18) and return it.

    Traced at ``batch`` x ``length`` (decode: after ``past`` cached tokens). ``dynamic``: batch, length and
    past length are symbolic (any size up to the context); else the graph takes exactly the traced shapes.
    ``exporter``: "dynamo" (``torch.export`` + onnxscript) or "torchscript" (the legacy tracer). ``optimize``
    (dynamo only): run onnxscript's graph optimizer (constant folding, dead code, shape-op simplification)
    on the exported graph, the exporter's default; False keeps the graph as translated."""
    if kind not in ("prefill", "decode"):
        raise ValueError(f"kind must be 'prefill' or 'decode', got {kind!r}")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    graph = (PrefillGraph if kind == "prefill" else DecodeGraph)(exportable(model)).eval()
    n_layer = model.config.n_layer
    args = _sample_inputs(model, kind, batch, length, past)
    inputs = ["ids"] if kind == "prefill" else ["ids", "positions", *kv_names("past", n_layer)]
    outputs = ["logits", *kv_names("present", n_layer)]
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        axes = {"ids": {0: "batch", 1: "length"}, "logits": {0: "batch", 1: "length"}}
        total = "length" if kind == "prefill" else "total"
        if kind == "decode":
            axes["positions"] = {0: "batch", 1: "length"}
            axes |= {name: {0: "batch", 2: "past"} for name in kv_names("past", n_layer)}
        axes |= {name: {0: "batch", 2: total} for name in kv_names("present", n_layer)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation / tracer notes, not about this graph
        if exporter == "dynamo":
            program = torch.onnx.export(graph, args, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=_dynamic_shapes(kind, n_layer, model.config.block_size)
                                        if dynamic else None,
                                        opset_version=OPSET, optimize=optimize, verbose=False)
            program.save(str(path))
        else:
            torch.onnx.export(graph, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes or None, opset_version=OPSET)
    return path


def _dynamic_shapes(kind: str, n_layer: int, block_size: int) -> tuple[Any, ...]:
    # lengths up to the context: the model refuses longer sequences, a guard the trace must be able to prove
    batch, length = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("length", min=1, max=block_size)
    if kind == "prefill":
        return ({0: batch, 1: length},)
    past = torch.export.Dim("past", min=1, max=block_size)
    # the past K/V are DecodeGraph.forward's *past: torch.export groups varargs into one tuple
    return ({0: batch, 1: length}, {0: batch, 1: length}, tuple({0: batch, 2: past} for _ in range(2 * n_layer)))


def onnx_cache_dir() -> Path:
    """Where exported graphs are kept: ``$HANDSON_CACHE/onnx`` (default ``~/.cache/handson-llm/onnx``)."""
    path = cache_dir() / "onnx"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_key(model: GPT) -> str:
    """A hash of the model's config and every weight's bytes: the same model exports to the same file."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_graph(model: GPT, kind: str, *, dynamic: bool = True, batch: int = 2, length: int = 5, past: int = 7,
                 exporter: str = "dynamo", optimize: bool = True) -> Path:
    """``export_graph`` into ``onnx_cache_dir()``, reusing the file when this model, kind and shapes were
    exported before (the key hashes the weights, the options and the torch version)."""
    options = f"{kind}-{dynamic}-{batch}x{length}+{past}-{exporter}-{optimize}-{torch.__version__}-opset{OPSET}"
    key = hashlib.sha256(f"{model_key(model)}-{options}".encode()).hexdigest()[:20]
    path = onnx_cache_dir() / key / f"{kind}.onnx"
    if not path.exists():
        tmp = path.with_name(f"{kind}.{os.getpid()}.tmp.onnx")  # one per process: concurrent exports never mix
        export_graph(model, tmp, kind, dynamic=dynamic, batch=batch, length=length, past=past, exporter=exporter,
                     optimize=optimize)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return path


# ------------------------------------------------------------------ eager sides of the checks


@torch.no_grad()
def eager_prefill(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor,
                  dynamic: bool = True, exporter: str = "dynamo") -> dict[str, Any]:
    """The shared GPT on its own (sdpa) attention through ``impl.kv_cache``'s ``KVCache``: ``logits``
    (B, T, V) and per layer the cached ``keys`` / ``values`` (B, nh, T, hs). ``dynamic`` and ``exporter``
    are ignored (the ONNX sides take them)."""
    model = GPT.from_state(config, state)
    B, T = idx.shape
    cache = KVCache.for_model(model, B, T)
    logits = model(idx, cache=cache)
    return {"logits": logits, "keys": list(cache.k[:, :, :, :T].unbind(0)),
            "values": list(cache.v[:, :, :, :T].unbind(0))}


@torch.no_grad()
def eager_decode_step(config: dict[str, Any], state: dict[str, torch.Tensor], prompt: torch.Tensor,
                      token: torch.Tensor, exporter: str = "dynamo") -> dict[str, Any]:
    """Prefill ``prompt`` (B, P) into a ``KVCache``, then one step with ``token`` (B, 1): that step's
    ``logits`` (B, 1, V) and the cache's ``keys`` / ``values`` per layer (B, nh, P + 1, hs) (``exporter``
    is ignored)."""
    model = GPT.from_state(config, state)
    B, P = prompt.shape
    cache = KVCache.for_model(model, B, P + 1)
    model(prompt, cache=cache)
    logits = model(token, cache=cache)
    return {"logits": logits, "keys": list(cache.k.unbind(0)), "values": list(cache.v.unbind(0))}


def eager_greedy(config: dict[str, Any], state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int,
                 exporter: str = "dynamo") -> torch.Tensor:
    """``impl.kv_cache.fast.greedy``: (B, T) prompt -> (B, T + max_new_tokens) ids (``exporter`` is ignored)."""
    from impl.kv_cache import fast

    return fast.greedy(config, state, prompt, max_new_tokens)
