"""The one training loop: AdamW, warm-up + cosine decay, clipping, gradient accumulation,
autocast (bf16 / fp16 with a loss scaler), validation checkpoints, bit-exact resume, JSONL metrics
(optionally TensorBoard too, see ``tracking.py``).

Token data may be any 1-D integer array: an in-memory ``np.ndarray`` or an ``np.memmap`` over a
token file far larger than memory (``random_batch`` only reads the windows it draws).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from impl.data.tokens import random_batch
from impl.gpt.model import lm_loss
from impl.train.checkpoint import CheckpointCorrupt, load_checkpoint, save_checkpoint
from impl.train.tracking import MetricsLog

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are nanoGPT's shakespeare_char CPU recipe."""

    max_iters: int = 2000
    batch_size: int = 12
    block_size: int = 64
    grad_accum_steps: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    dtype: str = "fp32"  # autocast dtype: fp32 (off), bf16, fp16 (needs a loss scaler)
    stop_after: int | None = None  # stop early at this iteration (to test resume)
    log_interval: int = 0  # log the step loss every this many iterations (0: eval rows only)
    tensorboard: bool = False  # also log to TensorBoard (when the package is installed)


class LossScaler(Protocol):
    """The ``torch.amp.GradScaler`` interface the loop uses (ours in P7 has the same)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor: ...

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None: ...

    def step(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def update(self) -> None: ...


def _scaler_state(scaler: LossScaler | None) -> dict[str, Any] | None:
    """The scaler's scalar state (scale, growth tracker) for a checkpoint, if it exposes one."""
    if scaler is None or not hasattr(scaler, "state_dict"):
        return None
    return {k: v.item() if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation
    step_losses: list[tuple[int, float]] = field(default_factory=list)  # (iter, loss) of this session
    final_val_loss: float = math.nan
    best_val_loss: float = math.nan
    iters: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def autocast(dtype: str, device: str):
    """An autocast context for ``dtype`` (a no-op for fp32)."""
    return torch.autocast(device_type=device, dtype=DTYPES[dtype], enabled=dtype != "fp32")


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module, data: np.ndarray, cfg: TrainConfig, device: str = "cpu"
) -> float:
    """Mean loss over ``eval_iters`` batches drawn from a fixed generator: the same batches at every
    evaluation, so the curve shows the model changing, not the sample."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = random_batch(data, cfg.batch_size, cfg.block_size, gen)
        with autocast(cfg.dtype, device):
            losses.append(lm_loss(model(x.to(device)), y.to(device)).item())
    model.train(was_training)
    return float(np.mean(losses))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]] | list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]],
    dtype: str = "fp32",
    scaler: LossScaler | None = None,
    grad_clip: float = 1.0,
) -> torch.Tensor:
    """One optimizer step over the micro-batches ``batches`` (inputs, targets), each (B, T), their
    gradients accumulated, under ``dtype``'s autocast (fp16 needs ``scaler``); returns the mean
    loss as a detached scalar tensor (no device sync). The loss is the language-model loss plus
    ``model.aux_loss()`` when a layer sets one (``impl.gpt.model``'s FFN seam).

    A micro-batch may carry a third item, keyword arguments for the model (``attention_mask`` of a
    padded batch, ``segment_ids`` of a packed one: fine-tuning, P4); targets of -100 (prompt tokens,
    padding) are left out of the loss, which is the mean over the remaining targets of each micro-batch."""
    if dtype == "fp16" and scaler is None:
        raise ValueError("dtype fp16 needs a loss scaler (pass scaler=...): fp16 gradients underflow")
    step_loss = torch.zeros((), device=batches[0][0].device)
    for x, y, *rest in batches:
        kwargs = rest[0] if rest else {}
        with autocast(dtype, x.device.type):
            loss = lm_loss(model(x, **kwargs), y)  # lm_loss computes in fp32
            aux = model.aux_loss() if hasattr(model, "aux_loss") else None  # e.g. an MoE's load balancing
            loss = (loss if aux is None else loss + aux) / len(batches)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        step_loss += loss.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _load_for_resume(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(meta, rng states) of the checkpoint to resume from, or None when there is none or it is
    corrupt: then the run starts from iteration 0, saying so in one line. A corrupt file is moved
    aside (``<name>.corrupt-<timestamp>``), never loaded, and the model and optimizer stay untouched."""
    if not path.exists():
        print(f"resume: no checkpoint at {path}; starting from iteration 0", file=sys.stderr)
        return None
    try:
        return load_checkpoint(path, model, optimizer)
    except CheckpointCorrupt as e:
        aside = path.with_name(f"{path.name}.corrupt-{datetime.now():%Y%m%dT%H%M%S.%f}")
        os.replace(path, aside)
        print(f"resume: {e}; moved it to {aside.name} and starting from iteration 0", file=sys.stderr)
        return None


def train(
    model: torch.nn.Module,
    train_data: np.ndarray,
    val_data: np.ndarray,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    scaler: LossScaler | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on token arrays; with ``out_dir``, checkpoint at each evaluation
    (``last.safetensors``, and ``best.safetensors`` on a new best val loss) and log
    ``metrics.jsonl``. ``resume`` continues from ``last.safetensors`` bit-exactly (a run killed at
    any moment, even mid-checkpoint, resumes to the same weights and log); without a usable
    checkpoint it starts from iteration 0 (see ``_load_for_resume``)."""
    device = next(model.parameters()).device.type
    if cfg.dtype == "fp16" and scaler is None:
        raise ValueError("dtype fp16 needs a loss scaler (pass scaler=...): fp16 gradients underflow")
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    out = Path(out_dir) if out_dir is not None else None
    result = TrainResult()
    start_iter = 0
    loaded = None
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir")
        loaded = _load_for_resume(out / "last.safetensors", model, optimizer)
    if loaded is not None:
        meta, rng = loaded
        start_iter = meta["iter"]
        gen.set_state(rng["batches"])
        torch.set_rng_state(rng["torch"])
        result.history = meta.get("history", [])
        result.best_val_loss = meta.get("best_val_loss", math.nan)
        if scaler is not None and meta.get("scaler") is not None and hasattr(scaler, "load_state_dict"):
            scaler.load_state_dict(meta["scaler"])  # fp16: the loss scale is part of the state
    metrics = MetricsLog(out, start_iter if loaded is not None else None, cfg.tensorboard) if out is not None else None
    model.train()
    stop = cfg.max_iters if cfg.stop_after is None else min(cfg.max_iters, cfg.stop_after)
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(range(start_iter, stop + 1), desc="train", disable=not progress, leave=False)
    for it in bar:
        evaluated_before_interruption = loaded is not None and it == start_iter
        if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and not evaluated_before_interruption:
            row = {
                "kind": "eval",
                "iter": it,
                "train_loss": estimate_loss(model, train_data, cfg, device),
                "val_loss": estimate_loss(model, val_data, cfg, device),
                "lr": lr_at(it, cfg),
                "elapsed_s": time.perf_counter() - t0,
            }
            result.history.append(row)
            bar.set_postfix(val=f"{row['val_loss']:.3f}")
            if metrics is not None:
                metrics.write(row)
            improved = not (row["val_loss"] >= result.best_val_loss)  # also True on the first (nan)
            if improved:
                result.best_val_loss = row["val_loss"]
            if out is not None:
                meta = {
                    "iter": it,
                    "train_config": asdict(cfg),
                    "history": result.history,
                    "best_val_loss": result.best_val_loss,
                    "scaler": _scaler_state(scaler),
                    **(extra_meta or {}),
                }
                rng = {"batches": gen.get_state(), "torch": torch.get_rng_state()}
                metrics.sync()  # the log rows up to here reach the disk before the checkpoint that follows them
                # best before last: a kill between the two resumes from the older last, which
                # redoes this evaluation and rewrites best; the other order would lose this best
                if improved:
                    save_checkpoint(out / "best.safetensors", model, None, None, meta)
                save_checkpoint(out / "last.safetensors", model, optimizer, rng, meta)
        if it == stop:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, cfg)
        batches = [random_batch(train_data, cfg.batch_size, cfg.block_size, gen)
                   for _ in range(cfg.grad_accum_steps)]
        step_loss = train_step(model, optimizer, [(x.to(device), y.to(device)) for x, y in batches],
                               cfg.dtype, scaler, cfg.grad_clip)
        tokens += sum(x.numel() for x, _ in batches)
        if cfg.log_interval > 0 and it % cfg.log_interval == 0:
            row = {"kind": "step", "iter": it, "loss": step_loss.item(), "lr": lr_at(it, cfg)}
            result.step_losses.append((it, row["loss"]))
            if metrics is not None:
                metrics.write(row)
    result.wall_s = time.perf_counter() - t0
    result.iters = stop
    result.tokens_per_s = tokens / result.wall_s if result.wall_s > 0 else 0.0
    if result.history:
        result.final_val_loss = result.history[-1]["val_loss"]
    if metrics is not None:
        metrics.close()
    return result
