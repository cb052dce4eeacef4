"""FP32 vs FP16 vs BF16 on one GPT: time of a training step and of an inference forward, weight
and activation memory, and how far the low-precision loss and logits land from fp32's.

The pieces (model, batch, step and forward closures) are shared with the claim workloads in
``benchmarks/workloads/mixed_precision.py``; the table and plot are ``python -m impl.mixed_precision``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.mixed_precision.fast import DynamicLossScaler
from impl.mixed_precision.inference import to_low_precision, weight_bytes
from impl.train.loop import TrainConfig, autocast, make_optimizer, train_step

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Shape:
    """Model and batch shape. The default is wide enough (512) that matmuls dominate the step."""

    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512
    block_size: int = 128
    batch_size: int = 8
    vocab_size: int = 65


def build_model(shape: Shape, device: str = "cpu", seed: int = 0) -> GPT:
    """A freshly initialised fp32 GPT of ``shape`` on ``device``."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=shape.vocab_size, block_size=shape.block_size, n_layer=shape.n_layer,
                       n_head=shape.n_head, n_embd=shape.n_embd)
    return GPT(config).to(device)


def random_batch(shape: Shape, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids x and targets y, each (batch_size, block_size)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randint(shape.vocab_size, (2, shape.batch_size, shape.block_size), generator=gen)
    return x.to(device), y.to(device)


def training_step(model: GPT, precision: str, shape: Shape) -> Callable[[], float]:
    """A closure taking one AdamW step on its own copy of ``model`` (fp32 master weights) under
    ``precision``'s autocast; fp16 gets a ``DynamicLossScaler``. Returns the step's loss."""
    model = copy.deepcopy(model).train()
    device = next(model.parameters()).device.type
    optimizer = make_optimizer(model, TrainConfig())
    scaler = DynamicLossScaler() if precision == "fp16" else None
    x, y = random_batch(shape, device)
    return lambda: train_step(model, optimizer, [(x, y)], precision, scaler).item()


def inference_forward(
    model: GPT, precision: str, shape: Shape, mode: str = "weights"
) -> Callable[[], torch.Tensor]:
    """A closure returning the logits (B, T, vocab) of one forward pass without gradients.

    ``mode="weights"`` stores the weights in ``precision`` (``to_low_precision``);
    ``mode="autocast"`` keeps them fp32 and runs matmuls in ``precision`` under autocast."""
    device = next(model.parameters()).device.type
    x, _ = random_batch(shape, device)
    if precision != "fp32" and mode == "weights":
        model = to_low_precision(model, precision)
    model = model.eval()

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with autocast(precision if mode == "autocast" else "fp32", device):
            return model(x)

    return forward


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


def _median_seconds(fns: dict[str, Callable[[], object]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per call, calls interleaved round by round after one warm-up each."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # CUDA kernels are asynchronous: wait before reading the clock
            if r > 0:  # round 0 is the warm-up
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


@dataclass
class Row:
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
    step = _median_seconds({p: training_step(model, p, shape) for p in precisions}, rounds, device)
    infer = _median_seconds({p: inference_forward(model, p, shape) for p in precisions}, rounds, device)
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
