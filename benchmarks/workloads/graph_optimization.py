"""Project 26 claims, measured on ``bpe-base`` (6 layers x 4 heads x 256 wide, vocab 4096, block 256, fp32).

- prefill: eager PyTorch (sdpa attention, ``no_grad``) against ONNX Runtime on the exported prefill graph
  (ORT_ENABLE_ALL) and against the JAX port under ``jax.jit`` (XLA), interleaved rounds in one process, the
  same thread count on every side;
- cached decode, batch 1: ``impl.kv_cache``'s greedy generation against the ORT loop (prefill graph, then
  one decode-step graph per token, the K/V arrays handed from one step to the next); both must produce the
  same tokens;
- node counts: the exported graphs against ORT's optimized graph at each level (deterministic);
- TensorRT: CUDA only (n/a here, with the reason).

Every workload checks that the fast side computed what eager did (logits within a tolerance, the same
tokens) before its timings count.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from harness.measure import Context, MeasurementError, NotApplicable, Plot, Result, interleaved
from impl import zoo
from impl.graph_optimization.export import cached_graph
from impl.graph_optimization.ort import LEVELS, OrtGPT, cached_session, level_report

MODEL = "bpe-base"
FULL_SHAPES = [(1, 128), (1, 256), (4, 128), (4, 256)]
QUICK_SHAPES = [(1, 128)]
# fp32 against fp32 computed in another order: logits of bpe-base are O(10); 1e-3 is ~100x what was seen
LOGIT_TOLERANCE = 1e-3


@functools.lru_cache(maxsize=1)
def _model() -> torch.nn.Module:
    model, _, _ = zoo.load(MODEL)
    return model.float().eval()


@functools.lru_cache(maxsize=1)
def _held_out() -> np.ndarray:
    model, tokenizer, meta = zoo.load(MODEL)
    return zoo.token_splits(tokenizer, meta)[1]


def _ids(batch: int, length: int) -> torch.Tensor:
    """``batch`` windows of held-out text, ``length`` tokens each, from fixed offsets."""
    val = _held_out()
    starts = [i * 997 for i in range(batch)]
    return torch.from_numpy(np.stack([val[s: s + length] for s in starts]).astype(np.int64))


def _cpu_only(ctx: Context) -> None:
    if ctx.device != "cpu":
        raise NotApplicable("measured with ONNX Runtime's and XLA's CPU backends; on CUDA see the TensorRT claim")


def _same_logits(name: str, fast: np.ndarray, eager: torch.Tensor) -> float:
    err = float(np.abs(np.asarray(fast, dtype=np.float64) - eager.double().numpy()).max())
    if not err <= LOGIT_TOLERANCE:
        raise MeasurementError(f"{name} logits differ from eager by {err:.3g} (> {LOGIT_TOLERANCE}): not the same work")
    return err


def _speedup_over_shapes(ctx: Context, fast_name: str, make_fast: Any, make_others: Any = None) -> Result:
    """eager time / ``fast`` time per shape (interleaved rounds); the figure is their geometric mean.
    ``make_others(ids)``: more sides timed in the same rounds (details only: their time / ``fast``'s)."""
    model = _model()
    shapes = QUICK_SHAPES if ctx.quick else FULL_SHAPES
    rounds = 3 if ctx.quick else 7
    per_shape, medians, q1s, q3s = {}, [], [], []
    for B, T in shapes:
        ids = _ids(B, T)
        fast = make_fast(ids)
        with torch.no_grad():
            eager_logits = model(ids)
        err = _same_logits(fast_name, fast(), eager_logits)

        def eager() -> None:
            with torch.no_grad():
                model(ids)

        others = make_others(ids) if make_others else {}
        timings = interleaved({"eager": eager, fast_name: fast, **others}, rounds=rounds, warmup=1)
        ratio, (q1, q3) = timings.ratio("eager", fast_name)
        medians.append(ratio)
        q1s.append(q1)
        q3s.append(q3)
        per_shape[f"{B}x{T}"] = {"speedup": round(ratio, 3), "iqr": [round(q1, 3), round(q3, 3)],
                                 "eager_ms": round(1e3 * timings.median_s("eager"), 2),
                                 f"{fast_name}_ms": round(1e3 * timings.median_s(fast_name), 2),
                                 "max_logit_error": float(f"{err:.3g}")}
        for name in others:
            per_shape[f"{B}x{T}"][f"{name}_ms"] = round(1e3 * timings.median_s(name), 2)
            per_shape[f"{B}x{T}"][f"{name} / {fast_name}"] = round(timings.ratio(name, fast_name)[0], 3)

    def geomean(xs: list[float]) -> float:
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    details = {"shapes (batch x tokens)": per_shape, "rounds": rounds,
               "threads": ctx.threads or torch.get_num_threads(),
               "figure": "geometric mean over the shapes of the per-shape median ratios eager / " + fast_name}
    return Result(geomean(medians), "x", (geomean(q1s), geomean(q3s)), details)


def ort_prefill_speedup(ctx: Context) -> Result:
    """Prefill of bpe-base: eager / ORT (exported graph at ORT_ENABLE_ALL)."""
    _cpu_only(ctx)
    threads = ctx.threads or torch.get_num_threads()
    path = str(cached_graph(_model(), "prefill"))  # the prefill graph only: no decode graph to export
    n_layer = _model().config.n_layer
    runner = OrtGPT(cached_session(path, "all", threads), None, n_layer)
    unoptimized = OrtGPT(cached_session(path, "disable_all", threads), None, n_layer)

    def make_fast(ids: torch.Tensor) -> Any:
        ids_np = ids.numpy()
        return lambda: runner.prefill(ids_np)[0]

    def make_others(ids: torch.Tensor) -> dict[str, Any]:
        ids_np = ids.numpy()
        return {"ort_disable_all": lambda: unoptimized.prefill(ids_np)[0]}

    result = _speedup_over_shapes(ctx, "ort", make_fast, make_others)
    result.details["graph"] = "dynamo exporter (torch.export + onnxscript), opset 18, dynamic batch and length"
    result.details["ort_disable_all"] = ("the same graph at ORT_DISABLE_ALL, timed in the same rounds: what ORT's "
                                         "graph optimizations add over its runtime alone")
    return result


@contextlib.contextmanager
def _cores(threads: int) -> Iterator[str]:
    """Run on ``threads`` cores when the harness gives torch fewer threads than the machine has: XLA's CPU
    backend sizes its own thread pool to the cores it may use, so pinning the process is what makes it use
    as many as torch (XLA_FLAGS would only apply before jax's first import in this process)."""
    available = sorted(os.sched_getaffinity(0))
    if threads >= len(available):
        yield f"{len(available)} cores, not pinned (torch: {threads} threads)"
        return
    os.sched_setaffinity(0, available[:threads])
    try:
        yield f"process pinned to {threads} of {len(available)} cores for both sides (torch: {threads} threads)"
    finally:
        os.sched_setaffinity(0, available)


def xla_prefill_speedup(ctx: Context) -> Result:
    """Prefill of bpe-base: eager / the JAX port under ``jax.jit``."""
    _cpu_only(ctx)
    from impl.graph_optimization.jax_gpt import JaxGPT

    model = _model()
    jax_model = JaxGPT(model.config.to_dict(), model.state_dict())

    def make_fast(ids: torch.Tensor) -> Any:
        ids_np = ids.numpy()
        jax_model(ids_np).block_until_ready()  # compile for this shape outside the timed calls
        return lambda: jax_model(ids_np).block_until_ready()

    with _cores(ctx.threads or torch.get_num_threads()) as cores:
        result = _speedup_over_shapes(ctx, "xla", make_fast)
    result.details["cores"] = cores
    return result


def ort_decode_speedup(ctx: Context) -> Result:
    """Batch-1 cached greedy generation: tokens/s through ORT / tokens/s through ``impl.kv_cache``."""
    _cpu_only(ctx)
    from impl.kv_cache.fast import generate

    model = _model()
    prompt_len, new = (32, 32) if ctx.quick else (64, 64)
    rounds = 3 if ctx.quick else 7
    prompt = _ids(1, prompt_len)
    runner = OrtGPT.from_model(model, "all", ctx.threads or torch.get_num_threads())
    eager_tokens = generate(model, prompt, new)
    ort_tokens = runner.greedy(prompt.numpy(), new)
    if not np.array_equal(eager_tokens.numpy(), ort_tokens):
        raise MeasurementError("ORT's greedy tokens differ from impl.kv_cache's: not the same work")
    unoptimized = OrtGPT.from_model(model, "disable_all", ctx.threads or torch.get_num_threads())
    timings = interleaved({"eager": lambda: generate(model, prompt, new),
                           "ort": lambda: runner.greedy(prompt.numpy(), new),
                           "ort_disable_all": lambda: unoptimized.greedy(prompt.numpy(), new)}, rounds=rounds, warmup=1)
    ratio, spread = timings.ratio("eager", "ort")
    details = {"prompt_tokens": prompt_len, "new_tokens": new, "rounds": rounds,
               "eager_tokens_per_s": round(new / timings.median_s("eager"), 1),
               "ort_tokens_per_s": round(new / timings.median_s("ort"), 1),
               "ort_disable_all_tokens_per_s": round(new / timings.median_s("ort_disable_all"), 1),
               "timed": "the whole generation, prompt prefill included, greedy, batch 1",
               "eager": "impl.kv_cache.fast.generate (pre-allocated KVCache, sdpa attention)",
               "ort": "prefill graph once, then one decode-step graph per token (ORT_ENABLE_ALL)",
               "threads": ctx.threads or torch.get_num_threads()}
    return Result(ratio, "x", spread, details)


def node_count_reduction(ctx: Context) -> Result:
    """Nodes of the raw exported prefill graph after ORT_ENABLE_ALL / its nodes as exported."""
    model = _model()
    graphs = {f"{kind} ({name})": cached_graph(model, kind, optimize=optimize)
              for name, optimize in (("raw", False), ("onnxscript-optimized", True)) for kind in ("prefill", "decode")}
    with tempfile.TemporaryDirectory(prefix="p26-levels-") as out:
        reports = {name: level_report(path, f"{out}/{i}") for i, (name, path) in enumerate(graphs.items())}
    columns = ["exported", *LEVELS]
    for report in reports.values():
        for entry in report.values():
            entry.pop("file")
    raw = reports["prefill (raw)"]
    ratio = raw["all"]["total"] / raw["exported"]["total"]
    details: dict[str, Any] = {
        "figure": "nodes(raw prefill graph after ORT_ENABLE_ALL) / nodes(raw prefill graph as exported)",
        "raw": "the dynamo exporter's translation with optimize=False; onnxscript-optimized: its default output",
        "totals": {name: {c: r[c]["total"] for c in columns} for name, r in reports.items()},
        "by_op": reports,
    }
    plot = Plot(title="bpe-base ONNX graphs: nodes per ORT optimization level", x=columns,
                series={name: [float(r[c]["total"]) for c in columns] for name, r in reports.items()},
                xlabel="graph (as exported, then each ORT level)", ylabel="nodes", kind="bar")
    return Result(ratio, "x", None, details, [plot])


def tensorrt_prefill_speedup(ctx: Context) -> Result:
    """Prefill of bpe-base at batch 4 x 256 on CUDA: eager / a TensorRT engine of the ONNX prefill graph."""
    from impl.graph_optimization import tensorrt

    reason = tensorrt.unavailable_reason()
    if reason is not None or ctx.device != "cuda":
        raise NotApplicable(reason or "TensorRT runs on CUDA devices only")
    engine = tensorrt.build_engine(cached_graph(_model(), "prefill"), 4, 256)
    model = copy.deepcopy(_model()).to("cuda")
    ids = _ids(4, 256).to("cuda")
    with torch.no_grad():
        eager_logits = model(ids)
    _same_logits("tensorrt", tensorrt.prefill_logits(engine, ids, model.config.vocab_size).cpu().numpy(),
                 eager_logits.cpu())

    def eager() -> None:
        with torch.no_grad():
            model(ids)

    timings = interleaved({"eager": eager, "tensorrt": lambda: tensorrt.prefill_logits(engine, ids, 4096)},
                          rounds=7, warmup=2, device="cuda")
    ratio, spread = timings.ratio("eager", "tensorrt")
    return Result(ratio, "x", spread, {"shape": "4 x 256", "rounds": 7})
