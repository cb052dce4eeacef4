"""Mixed precision training with the shared loop (its ``train_step`` is the AMP step): a short deterministic
run whose validation loss the spec compares across precisions.

Autocast keeps the master weights in fp32 and runs matmuls in bf16/fp16; gradients come back
to the fp32 weights, so the optimizer updates full-precision values (Micikevicius et al., 2018,
section 3.1: without the fp32 master copy, updates smaller than half an ulp of a weight vanish).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from impl.data.corpus import load_text, split_text
from impl.data.tokens import CharTokenizer
from impl.gpt.model import GPT, GPTConfig
from impl.mixed_precision.fast import DynamicLossScaler
from impl.train.loop import LossScaler, TrainConfig, train


@dataclass(frozen=True)
class Recipe:
    """A run small enough for a unit test: 2 layers, 64 wide, 150 steps on 1M characters."""

    corpus: str = "shakespeare"
    chars: int = 1_000_000  # the first ``chars`` characters of the corpus
    iters: int = 150
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32
    batch_size: int = 16
    learning_rate: float = 1e-3
    seed: int = 1337
    threads: int = 1  # tiny matmuls: a second thread costs more in sync than it saves

    def train_config(self, precision: str) -> TrainConfig:
        return TrainConfig(
            max_iters=self.iters, batch_size=self.batch_size, block_size=self.block_size,
            learning_rate=self.learning_rate, min_lr=self.learning_rate / 10, warmup_iters=10,
            lr_decay_iters=self.iters, eval_interval=self.iters, eval_iters=20, seed=self.seed,
            dtype=precision,
        )


@lru_cache(maxsize=4)
def char_ids(corpus: str, chars: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train ids, val ids, vocab size) of the first ``chars`` characters of ``corpus``, split 90/10."""
    text = load_text(corpus)[:chars]
    tok = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text)
    as_ids = lambda s: np.array(tok.encode(s), dtype=np.uint16)  # noqa: E731
    return as_ids(train_text), as_ids(val_text), tok.vocab_size


def fresh_model(recipe: Recipe) -> GPT:
    """The recipe's GPT, initialised from its seed (fp32 weights)."""
    _, _, vocab_size = char_ids(recipe.corpus, recipe.chars)
    torch.manual_seed(recipe.seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=recipe.block_size, n_layer=recipe.n_layer,
                         n_head=recipe.n_head, n_embd=recipe.n_embd))


def train_and_evaluate(model: GPT, precision: str, recipe: Recipe, scaler: LossScaler | None = None) -> float:
    """Train ``model`` with the shared loop under ``precision`` (fp16 gets ``scaler``, by default a
    ``DynamicLossScaler``); returns the final val loss."""
    train_ids, val_ids, _ = char_ids(recipe.corpus, recipe.chars)
    if precision == "fp16" and scaler is None:
        scaler = DynamicLossScaler()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        cfg = recipe.train_config(precision)
        result = train(model, train_ids, val_ids, cfg, scaler=scaler, progress=False)
    finally:
        torch.set_num_threads(threads)
    return result.final_val_loss


def final_val_loss(precision: str = "bf16", **recipe: int | float | str) -> float:
    """Val loss (nats) after the ``Recipe`` run (fields overridable by keyword) in ``precision``."""
    r = Recipe(**recipe)  # type: ignore[arg-type]
    return train_and_evaluate(fresh_model(r), precision, r)
