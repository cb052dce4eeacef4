"""Project 7 claims: bf16 vs fp32 speed (training step, inference), fp16 speed (CUDA; the CPU
figure goes in the details), and weight and activation memory; and the FP32 / FP16 / BF16 table
``python -m impl.mixed_precision`` prints (``compare_precisions``), measured the same way.

The claim shape is a GPT 4 layers x 512 wide, 8 heads, batch 8 x 128 tokens: wide enough that
matmuls dominate the step, so the figure measures the number format and not Python overhead.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from harness.measure import Context, Plot, Result, interleaved, peak_memory_bytes
from impl.gpt.model import GPT, lm_loss
from impl.mixed_precision.inference import LOW_PRECISION, to_low_precision, weight_bytes
from impl.mixed_precision.steps import PRECISIONS, Shape, build_model, inference_forward, random_batch, training_step
from impl.train.loop import autocast

CLAIM_SHAPE = Shape(n_layer=4, n_head=8, n_embd=512, block_size=128, batch_size=8)
MEMORY_SHAPE = replace(CLAIM_SHAPE, batch_size=16)  # more tokens: activations, not weights, dominate
# CPUs have no fast fp16 matmul units: an fp16 training step at the claim shape takes tens of
# seconds here, so the CPU fp16 figure is measured on 64 tokens, and says so. fp16's penalty grows
# with the token count, so this shape flatters it.
FP16_CPU_SHAPE = replace(CLAIM_SHAPE, batch_size=1, block_size=64)
MB = 2**20


def saved_activation_bytes(model: GPT, precision: str, shape: Shape) -> int:
    """Exact bytes autograd keeps for the backward pass of one training forward under autocast:
    every saved tensor once (by storage), the model's own parameters excluded."""
    device = next(model.parameters()).device.type
    x, y = random_batch(shape, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, device):
        lm_loss(model(x), y)
    return sum(storages.values())


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


def built_model(precision: str, device: str = "cpu", **shape: int) -> Any:
    """Held-memory setup: the closure builds the fp32 GPT of ``shape`` on ``device`` and, for bf16
    or fp16, converts it (``to_low_precision``) and drops the fp32 original; it returns the model,
    which stays alive while the memory it holds is read. A throwaway one-layer model is built (and
    converted) first, so one-time costs fall before the baseline: torch's lazy initialisation and the
    library code pages the first conversion touches, which the resident set counts too."""
    s = Shape(**shape)
    warm = build_model(replace(s, n_layer=1, n_embd=64, n_head=1), device)
    if precision != "fp32":
        to_low_precision(warm, precision)

    def build() -> torch.nn.Module:
        model = build_model(s, device)
        return model if precision == "fp32" else to_low_precision(model, precision)

    return build


def weight_bytes_ratio(ctx: Context) -> Result:
    """Memory held by the claim model built in fp32 / built in fp32 and converted to bf16, each in a
    fresh process (glibc returning freed blocks to the OS, "trim"); glibc's default policy, each
    build's peak and the exact tensor bytes in the details."""
    target = "benchmarks.workloads.mixed_precision:built_model"
    figures = {(p, a, m): peak_memory_bytes(target, allocator=a, measure=m, precision=p, device=ctx.device,
                                            **asdict(CLAIM_SHAPE))
               for p in ("fp32", "bf16") for a in ("trim", "default") for m in ("held", "peak")}
    model = build_model(CLAIM_SHAPE, ctx.device)
    exact = {p: weight_bytes(model if p == "fp32" else model.to(LOW_PRECISION[p])) for p in ("fp32", "bf16")}
    details: dict[str, Any] = {"shape": _describe(CLAIM_SHAPE), "parameters": model.num_params()}
    details |= {f"{p} {m} MB ({a})": round(v / MB, 2) for (p, a, m), v in figures.items()}
    details |= {"ratio held (default allocator)": round(figures["fp32", "default", "held"]
                                                        / figures["bf16", "default", "held"], 3),
                "exact tensor bytes fp32": exact["fp32"], "exact tensor bytes bf16": exact["bf16"],
                "exact ratio": exact["fp32"] / exact["bf16"]}
    bars = {f"{p} held": figures[p, "trim", "held"] / MB for p in ("fp32", "bf16")}
    bars |= {f"{p} peak while building": figures[p, "trim", "peak"] / MB for p in ("fp32", "bf16")}
    plot = _bar_plot("Model weights in a fresh process: held after building, and peak while building",
                     bars, "MB")
    return Result(value=figures["fp32", "trim", "held"] / figures["bf16", "trim", "held"], unit="x",
                  details=details, plots=[plot])


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


def _peak_ratio(setup: str, shape: Shape, device: str, repeats: int, allocator: str) -> tuple[float, dict[str, float]]:
    target = f"benchmarks.workloads.mixed_precision:{setup}"
    peaks = {p: statistics.median(peak_memory_bytes(target, allocator=allocator, precision=p, device=device,
                                                    **asdict(shape))
                                  for _ in range(repeats))
             for p in ("fp32", "bf16")}
    return peaks["fp32"] / peaks["bf16"], {f"{p}_peak_mb ({allocator})": round(v / MB, 1) for p, v in peaks.items()}


def activation_memory_ratio(ctx: Context) -> Result:
    """Peak memory of a training forward in a fresh process, fp32 / bf16 autocast, with glibc
    returning freed blocks to the OS ("trim", the claim); glibc's default policy in the details."""
    repeats = 1 if ctx.quick else 3
    value, details = _peak_ratio("training_forward", MEMORY_SHAPE, ctx.device, repeats, "trim")
    default_ratio, default = _peak_ratio("training_forward", MEMORY_SHAPE, ctx.device, repeats, "default")
    model = build_model(MEMORY_SHAPE, ctx.device)
    saved = {p: saved_activation_bytes(model, p, MEMORY_SHAPE) for p in ("fp32", "bf16")}
    infer_ratio, infer = _peak_ratio("inference_forward_peak", MEMORY_SHAPE, ctx.device, repeats, "trim")
    details |= {
        **default, "ratio (default allocator)": round(default_ratio, 3),
        "shape": _describe(MEMORY_SHAPE), "peak_repeats": repeats,
        "saved_for_backward_fp32_mb": round(saved["fp32"] / MB, 1),
        "saved_for_backward_bf16_mb": round(saved["bf16"] / MB, 1),
        "saved_for_backward_ratio": round(saved["fp32"] / saved["bf16"], 3),
        "inference_peak_ratio_bf16_weights (trim)": round(infer_ratio, 3),
        **{f"inference_{k}": v for k, v in infer.items()},
    }
    bars = {f"{p} peak": details[f"{p}_peak_mb (trim)"] for p in ("fp32", "bf16")}
    bars |= {f"{p} saved for backward": details[f"saved_for_backward_{p}_mb"] for p in ("fp32", "bf16")}
    plot = _bar_plot("Training forward, fp32 vs bf16 autocast: peak (fresh process, trim) and exact saved bytes",
                     bars, "MB")
    return Result(value=value, unit="x", details=details, plots=[plot])


# The table of ``python -m impl.mixed_precision``


@dataclass
class Row:
    """One precision's line of the table: times, speedups over fp32, memory and distance from fp32."""

    precision: str
    train_step_ms: float
    train_speedup: float  # time(fp32) / time(this precision)
    inference_ms: float
    inference_speedup: float
    weight_mb: float  # weights stored in this precision
    saved_activation_mb: float  # kept for backward by the autocast training forward
    loss_diff: float  # |loss - fp32 loss|, same weights and batch
    max_logit_diff: float  # max |logits - fp32 logits|, inference with weights in this precision


def compare_precisions(
    shape: Shape, precisions: tuple[str, ...] = PRECISIONS, rounds: int = 5, device: str = "cpu"
) -> list[Row]:
    """One ``Row`` per precision (fp32 is always measured: it is the reference)."""
    precisions = ("fp32", *[p for p in precisions if p != "fp32"])
    model = build_model(shape, device)
    steps = interleaved({p: training_step(model, p, shape) for p in precisions}, rounds, 1, device)
    forwards = interleaved({p: inference_forward(model, p, shape) for p in precisions}, rounds, 1, device)
    step = {p: steps.median_s(p) for p in precisions}
    infer = {p: forwards.median_s(p) for p in precisions}
    x, y = random_batch(shape, device)
    with torch.no_grad():
        losses = {}
        for p in precisions:
            with autocast(p, device):
                losses[p] = lm_loss(model(x), y).item()
        logits = {p: inference_forward(model, p, shape)().float() for p in precisions}
    mb = 2.0**20
    return [
        Row(p, 1e3 * step[p], step["fp32"] / step[p], 1e3 * infer[p], infer["fp32"] / infer[p],
            weight_bytes(model if p == "fp32" else to_low_precision(model, p)) / mb,
            saved_activation_bytes(model, p, shape) / mb, abs(losses[p] - losses["fp32"]),
            (logits[p] - logits["fp32"]).abs().max().item())
        for p in precisions
    ]


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    heads = list(asdict(rows[0]))
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in asdict(r).values()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))  # noqa: E731
    return "\n".join([line(heads), *(line(c) for c in cells)])


def plot_rows(rows: list[Row], path: str, title: str = "") -> None:
    """A bar chart of step and forward times per precision, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        positions = [j + i * width for j in range(2)]
        bars = ax.bar(positions, [r.train_step_ms, r.inference_ms], width, label=r.precision)
        ax.bar_label(bars, labels=[f"{r.train_speedup:.2g}x", f"{r.inference_speedup:.2g}x"], fontsize=8)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(2)], ["training step", "inference forward"])
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(title or "FP32 vs FP16 vs BF16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
