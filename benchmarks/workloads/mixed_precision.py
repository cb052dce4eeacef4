"""Project 7 claims: bf16 vs fp32 speed (training step, inference), fp16 speed (CUDA; the CPU
figure goes in the details), and weight and activation memory.

The claim shape is a GPT 4 layers x 512 wide, 8 heads, batch 8 x 128 tokens: wide enough that
matmuls dominate the step, so the figure measures the number format and not Python overhead.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, replace
from typing import Any

import torch

from harness.measure import Context, Plot, Result, interleaved, peak_memory_bytes
from impl.gpt.model import lm_loss
from impl.mixed_precision.benchmark import (
    Shape,
    build_model,
    inference_forward,
    random_batch,
    saved_activation_bytes,
    training_step,
)
from impl.mixed_precision.inference import to_low_precision, weight_bytes
from impl.train.loop import autocast

CLAIM_SHAPE = Shape(n_layer=4, n_head=8, n_embd=512, block_size=128, batch_size=8)
MEMORY_SHAPE = replace(CLAIM_SHAPE, batch_size=16)  # more tokens: activations, not weights, dominate
# an fp16 training step at the claim shape takes ~30 s on this CPU (no fp16 matmul units: ~36x
# slower than fp32), so the CPU fp16 figure is measured on 64 tokens, and says so. fp16's
# penalty grows with the token count, so this shape flatters it.
FP16_CPU_SHAPE = replace(CLAIM_SHAPE, batch_size=1, block_size=64)
MB = 2**20


def _describe(s: Shape) -> str:
    return f"{s.n_layer} layers x {s.n_embd} wide, {s.n_head} heads, batch {s.batch_size} x {s.block_size}"


def _bar_plot(title: str, bars: dict[str, float], ylabel: str) -> Plot:
    """One bar per entry, labelled with its key (the report reads bar labels from ``xlabel``)."""
    return Plot(title, list(range(len(bars))), {ylabel: list(bars.values())}, xlabel=" | ".join(bars),
                ylabel=ylabel, kind="bar")


def _race(
    kind: str, shape: Shape, precisions: tuple[str, ...], device: str, rounds: int,
    with_autocast: bool = False,
) -> dict[str, Any]:
    """Interleaved timing of a training step (``kind="train"``) or inference forward in each
    precision (inference: weights stored in it; ``with_autocast`` adds fp32 weights under bf16
    autocast); returns median ms of each and its speedup over fp32 with the (q1, q3)."""
    model = build_model(shape, device)
    make = training_step if kind == "train" else inference_forward
    fns = {p: make(model, p, shape) for p in precisions}
    if with_autocast:
        fns["bf16_autocast"] = inference_forward(model, "bf16", shape, mode="autocast")
    t = interleaved(fns, rounds=rounds, warmup=1, device=device)
    out: dict[str, Any] = {f"{name}_ms": round(1e3 * t.median_s(name), 2) for name in fns}
    for name in list(fns)[1:]:
        out[f"{name}_speedup"], out[f"{name}_spread"] = t.ratio("fp32", name)
    return out


def _loss_and_logit_diff(shape: Shape, device: str, precision: str = "bf16") -> dict[str, float]:
    """|loss(precision autocast) - loss(fp32)| and max |logits(precision weights) - logits(fp32)|."""
    model = build_model(shape, device).eval()
    x, y = random_batch(shape, device)
    with torch.no_grad():
        fp32 = model(x)
        with autocast(precision, torch.device(device).type):
            low_loss = lm_loss(model(x), y).item()
        low_logits = to_low_precision(model, precision)(x).float()
    return {f"{precision}_loss_diff_nats": abs(low_loss - lm_loss(fp32, y).item()),
            f"{precision}_max_logit_diff": (low_logits - fp32).abs().max().item()}


def _fp16_shape(ctx: Context) -> Shape:
    return FP16_CPU_SHAPE if ctx.device == "cpu" else CLAIM_SHAPE


def _fp16_cpu_figure(kind: str, ctx: Context) -> dict[str, Any]:
    shape = _fp16_shape(ctx)
    race = _race(kind, shape, ("fp32", "fp16"), "cpu", 2 if ctx.quick else 4)
    return {"cpu_fp16_speedup_vs_fp32": round(race["fp16_speedup"], 4), "cpu_fp16_ms": race["fp16_ms"],
            "cpu_fp16_fp32_ms": race["fp32_ms"], "cpu_fp16_shape": _describe(shape)}


def _bf16_speedup(kind: str, ctx: Context) -> Result:
    widths = [CLAIM_SHAPE.n_embd] if ctx.quick else [256, CLAIM_SHAPE.n_embd, 768]
    rounds = 5 if ctx.quick else 9
    races = {w: _race(kind, replace(CLAIM_SHAPE, n_embd=w), ("fp32", "bf16"), ctx.device, rounds,
                      with_autocast=kind == "infer" and w == CLAIM_SHAPE.n_embd)
             for w in widths}
    claim = races[CLAIM_SHAPE.n_embd]
    details: dict[str, Any] = {"shape": _describe(CLAIM_SHAPE), "threads": torch.get_num_threads(),
                               "fp32_ms": claim["fp32_ms"], "bf16_ms": claim["bf16_ms"]}
    if kind == "infer":
        details["bf16_autocast_ms"] = claim["bf16_autocast_ms"]
        details["bf16_autocast_speedup"] = round(claim["bf16_autocast_speedup"], 3)
    details |= {f"speedup_at_width_{w}": round(r["bf16_speedup"], 3) for w, r in races.items()}
    details |= _loss_and_logit_diff(CLAIM_SHAPE, ctx.device)
    if ctx.device == "cpu":
        details |= _fp16_cpu_figure(kind, ctx)
    what = "training step (fp32 master weights)" if kind == "train" else "inference forward (bf16 weights)"
    bars = {f"{p} @{w}": r[f"{p}_ms"] for w, r in races.items() for p in ("fp32", "bf16")}
    plot = _bar_plot(f"{what}, fp32 vs bf16, by model width", bars, "ms (median)")
    return Result(value=claim["bf16_speedup"], unit="x", spread=claim["bf16_spread"], details=details,
                  plots=[plot])


def bf16_train_step_speedup(ctx: Context) -> Result:
    """time(fp32 training step) / time(bf16 autocast training step) at the claim shape."""
    return _bf16_speedup("train", ctx)


def bf16_inference_speedup(ctx: Context) -> Result:
    """time(fp32 forward) / time(forward with bf16 weights); autocast's speedup in the details."""
    return _bf16_speedup("infer", ctx)


def fp16_train_step_speedup(ctx: Context) -> Result:
    """time(fp32 step) / time(fp16 autocast step with our DynamicLossScaler); on a CPU at a small
    shape (``FP16_CPU_SHAPE``)."""
    shape = _fp16_shape(ctx)
    rounds = 3 if ctx.quick else 7
    train = _race("train", shape, ("fp32", "fp16"), ctx.device, rounds)
    infer = _race("infer", shape, ("fp32", "fp16"), ctx.device, rounds)
    details = {"shape": _describe(shape), "fp32_ms": train["fp32_ms"], "fp16_ms": train["fp16_ms"],
               "fp16_inference_speedup": round(infer["fp16_speedup"], 3),
               **_loss_and_logit_diff(shape, ctx.device, "fp16")}
    if ctx.device.startswith("cuda"):
        details["tf32_matmul_allowed"] = torch.backends.cuda.matmul.allow_tf32
    return Result(value=train["fp16_speedup"], unit="x", spread=train["fp16_spread"], details=details)


def weight_bytes_ratio(ctx: Context) -> Result:
    """Exact bytes of the claim model's weights in fp32 / in bf16."""
    model = build_model(CLAIM_SHAPE, ctx.device)
    fp32, bf16 = weight_bytes(model), weight_bytes(to_low_precision(model, "bf16"))
    return Result(value=fp32 / bf16, unit="x", details={
        "parameters": model.num_params(), "fp32_bytes": fp32, "bf16_bytes": bf16,
        "fp16_bytes": weight_bytes(to_low_precision(model, "fp16"))})


def training_forward(precision: str, device: str = "cpu", **shape: int) -> Any:
    """Peak-memory setup: a model and batch of ``shape``; the closure runs one training forward
    under ``precision``'s autocast and holds the graph (what backward needs) until it returns."""
    s = Shape(**shape)
    model = build_model(s, device).train()
    x, y = random_batch(s, device)

    def forward() -> None:
        with autocast(precision, torch.device(device).type):
            loss = lm_loss(model(x), y)
        del loss  # graph freed only now: the peak includes every saved activation

    return forward


def inference_forward_peak(precision: str, device: str = "cpu", **shape: int) -> Any:
    """Peak-memory setup: the closure runs one no-grad forward with weights stored in ``precision``."""
    s = Shape(**shape)
    return inference_forward(build_model(s, device), precision, s)


def _peak_ratio(setup: str, shape: Shape, device: str, repeats: int) -> tuple[float, dict[str, float]]:
    target = f"benchmarks.workloads.mixed_precision:{setup}"
    peaks = {p: statistics.median(peak_memory_bytes(target, precision=p, device=device, **asdict(shape))
                                  for _ in range(repeats))
             for p in ("fp32", "bf16")}
    return peaks["fp32"] / peaks["bf16"], {f"{p}_peak_mb": round(v / MB, 1) for p, v in peaks.items()}


def activation_memory_ratio(ctx: Context) -> Result:
    """Peak memory of a training forward in a fresh process, fp32 / bf16 autocast."""
    repeats = 1 if ctx.quick else 3
    value, details = _peak_ratio("training_forward", MEMORY_SHAPE, ctx.device, repeats)
    model = build_model(MEMORY_SHAPE, ctx.device)
    saved = {p: saved_activation_bytes(model, p, MEMORY_SHAPE) for p in ("fp32", "bf16")}
    infer_ratio, infer = _peak_ratio("inference_forward_peak", MEMORY_SHAPE, ctx.device, repeats)
    details |= {
        "shape": _describe(MEMORY_SHAPE), "peak_repeats": repeats,
        "saved_for_backward_fp32_mb": round(saved["fp32"] / MB, 1),
        "saved_for_backward_bf16_mb": round(saved["bf16"] / MB, 1),
        "saved_for_backward_ratio": round(saved["fp32"] / saved["bf16"], 3),
        "inference_peak_ratio_bf16_weights": round(infer_ratio, 3),
        **{f"inference_{k}": v for k, v in infer.items()},
    }
    bars = {f"{p} peak": details[f"{p}_peak_mb"] for p in ("fp32", "bf16")}
    bars |= {f"{p} saved for backward": details[f"saved_for_backward_{p}_mb"] for p in ("fp32", "bf16")}
    plot = _bar_plot("Training forward, fp32 vs bf16 autocast: peak (fresh process) and exact saved bytes",
                     bars, "MB")
    return Result(value=value, unit="x", details=details, plots=[plot])
