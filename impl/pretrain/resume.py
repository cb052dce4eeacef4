"""Interrupt a run and resume it: the losses must be those of the run that never stopped.

Both functions train the same tiny GPT on the same memory-mapped token file for ``max_iters``;
``resumed`` stops at ``interrupt_at`` (losing the steps since the last checkpoint, as a crash
would), builds a fresh model, and continues from ``last.safetensors``. What they return is
read back from ``metrics.jsonl``, so the log of the resumed run is checked too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from impl.gpt.model import GPT, GPTConfig
from impl.train.loop import TrainConfig, train
from impl.train.tracking import read_metrics


def markov_tokens(path: Path, vocab_size: int, n_tokens: int, seed: int) -> np.memmap:
    """A uint16 token file where each id mostly follows from the previous one (learnable),
    opened as a read-only memmap: the data path of real pre-training, at toy size."""
    rng = np.random.default_rng(seed)
    ids = np.empty(n_tokens, dtype=np.uint16)
    ids[0] = 0
    noise = rng.integers(0, vocab_size, n_tokens)
    follow = rng.random(n_tokens) < 0.8
    for i in range(1, n_tokens):
        ids[i] = (3 * ids[i - 1] + 1) % vocab_size if follow[i] else noise[i]
    ids.tofile(path)
    return np.memmap(path, dtype=np.uint16, mode="r")


@contextmanager
def _one_thread() -> Iterator[None]:
    """Toy shapes: extra intra-op threads only add synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(seed: int, n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int,
         batch_size: int, max_iters: int, eval_interval: int, dropout: float, grad_accum_steps: int,
         precision: str, interrupt_at: int | None) -> dict[str, object]:
    model_cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd, dropout=dropout)
    train_cfg = TrainConfig(max_iters=max_iters, batch_size=batch_size, block_size=block_size,
                            grad_accum_steps=grad_accum_steps, warmup_iters=max_iters // 4,
                            lr_decay_iters=max_iters, eval_interval=eval_interval, eval_iters=2,
                            seed=seed, dtype=precision, log_interval=1)
    with tempfile.TemporaryDirectory(prefix="pretrain-resume-") as tmp, _one_thread():
        out = Path(tmp) / "run"
        train_ids = markov_tokens(Path(tmp) / "train.bin", vocab_size, 4000, seed)
        val_ids = markov_tokens(Path(tmp) / "val.bin", vocab_size, 1000, seed + 1)
        torch.manual_seed(seed)
        model = GPT(model_cfg)
        if interrupt_at is not None:
            stopped = TrainConfig(**{**train_cfg.__dict__, "stop_after": interrupt_at})
            train(model, train_ids, val_ids, stopped, out, progress=False)
            torch.manual_seed(seed + 12345)  # a new process: other weights until the checkpoint loads
            model = GPT(model_cfg)
            train(model, train_ids, val_ids, train_cfg, out, resume=True, progress=False)
        else:
            train(model, train_ids, val_ids, train_cfg, out, progress=False)
        rows = read_metrics(out)
        del train_ids, val_ids  # release the memmaps before the directory goes
    evals = [r for r in rows if r["kind"] == "eval"]
    return {
        "step_iters": [r["iter"] for r in rows if r["kind"] == "step"],
        "step_losses": [r["loss"] for r in rows if r["kind"] == "step"],
        "eval_iters": [r["iter"] for r in evals],
        "val_losses": [r["val_loss"] for r in evals],
        "train_losses": [r["train_loss"] for r in evals],
        "final_weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def uninterrupted(seed: int, n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int,
                  batch_size: int, max_iters: int, eval_interval: int, dropout: float,
                  grad_accum_steps: int, precision: str, interrupt_at: int) -> dict[str, object]:
    """Losses (per step and per evaluation, from metrics.jsonl) and final weights of a run
    of ``max_iters`` that is never stopped (``interrupt_at`` is ignored: the same case feeds both)."""
    return _run(seed, n_layer, n_head, n_embd, vocab_size, block_size, batch_size, max_iters,
                eval_interval, dropout, grad_accum_steps, precision, None)


def resumed(seed: int, n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int,
            batch_size: int, max_iters: int, eval_interval: int, dropout: float,
            grad_accum_steps: int, precision: str, interrupt_at: int) -> dict[str, object]:
    """Same contract as ``uninterrupted``, for a run stopped at ``interrupt_at`` and resumed from
    its last checkpoint by a fresh model."""
    return _run(seed, n_layer, n_head, n_embd, vocab_size, block_size, batch_size, max_iters,
                eval_interval, dropout, grad_accum_steps, precision, interrupt_at)
