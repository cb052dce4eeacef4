"""Self-distillation of the exit heads from the final layer, on the shared training loop.

The body (``bpe-base``) is frozen; only the heads train. Each head l learns to predict what the
full model predicts, from the state after block l:

    loss = mean over l = 1..L-1 of T^2 * KL(softmax(final / T) || softmax(head_l / T))

with P18's KD loss (``impl.distillation.fast.kd_loss``). The shared loop (``impl.train.loop.train``,
not editable: it is hashed into the model cache key) takes no loss function but adds
``model.aux_loss()`` to the language-model loss; ``ExitDistiller`` plugs in there, as P18's
``Distiller`` does: its forward returns the frozen model's final logits (a constant LM term: no
gradient, so the heads train on the KD term alone) and sets the KD term as its ``aux_loss``. The
body lives in a tuple, outside the module tree: the optimizer, clipping and ``train()`` see the heads
only.

The heads for ``bpe-base`` are cached through ``impl.model_cache`` (``bpe-base-early-exit``, and a
shorter ``-quick`` recipe for the quick bench), keyed by bpe-base's own cache key, the recipe and
this file's and ``heads.py``'s code: the bench trains them once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from impl import model_cache
from impl.distillation.fast import kd_loss
from impl.early_exit import heads as heads_module
from impl.early_exit.heads import ExitHeads
from impl.gpt.model import GPT
from impl.train.loop import TrainConfig, train

CACHE_NAME = "bpe-base-early-exit"
RECIPES = {
    # about 2 minutes on an idle 2-core CPU (the budget: 3)
    "full": {"rank": 64, "temperature": 1.0, "steps": 250, "batch_size": 8, "block_size": 128,
             "learning_rate": 3e-3, "warmup_iters": 20, "seed": 0},
    # the quick bench's heads: the same recipe, 20 steps of 4 x 128
    "quick": {"rank": 64, "temperature": 1.0, "steps": 20, "batch_size": 4, "block_size": 128,
              "learning_rate": 3e-3, "warmup_iters": 5, "seed": 0},
}
EVAL_TOKENS = 16 * 128  # held-out tokens each head's agreement with the final layer is measured on


class ExitDistiller(nn.Module):
    """Frozen ``model`` + trainable ``heads``: forward returns the model's final logits (B, T, V); with
    gradients on it sets ``aux_loss()`` to the mean over heads of the KD loss against those logits."""

    def __init__(self, model: GPT, heads: ExitHeads, temperature: float = 1.0):
        super().__init__()
        model.requires_grad_(False).eval()
        self.body = (model,)  # a tuple, not a submodule: never optimised, clipped or put in train mode
        self.heads = heads
        self.temperature = float(temperature)
        self._aux: torch.Tensor | None = None

    @property
    def config(self):
        """The body's config (the loop and callers read ``model.config``)."""
        return self.body[0].config

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        model = self.body[0]
        with torch.no_grad():
            states = model.hidden_states(idx, **kwargs)  # L + 1 states (B, T, C)
            final = model.head(states[-1])  # (B, T, V): the teacher
        if not torch.is_grad_enabled():  # the loop's evaluations: the model alone
            self._aux = None
            return final
        losses = [kd_loss(self.heads.logits(layer, states[layer], model), final, self.temperature)
                  for layer in range(1, model.config.n_layer)]
        self._aux = torch.stack(losses).mean()
        return final

    def aux_loss(self) -> torch.Tensor | None:
        """The heads' mean KD loss of the last forward with gradients (None after an evaluation)."""
        return self._aux


def train_heads(model: GPT, train_ids: np.ndarray, val_ids: np.ndarray, rank: int, temperature: float, steps: int,
                batch_size: int, block_size: int, learning_rate: float, warmup_iters: int,
                seed: int = 0) -> tuple[ExitHeads, list[tuple[int, float]]]:
    """Heads for ``model`` self-distilled on ``train_ids`` with the body frozen (shared loop, AdamW, warm-up +
    cosine to lr / 10); returns the heads (eval mode) and the step losses (LM constant + mean KD)."""
    torch.manual_seed(seed)
    heads = ExitHeads.for_model(model, rank)
    cfg = TrainConfig(max_iters=steps, lr_decay_iters=steps, warmup_iters=warmup_iters, batch_size=batch_size,
                      block_size=block_size, learning_rate=learning_rate, min_lr=learning_rate / 10, beta2=0.95,
                      weight_decay=0.0, eval_interval=10**9, eval_iters=1, seed=seed,
                      log_interval=max(1, steps // 10))
    result = train(ExitDistiller(model, heads, temperature), train_ids, val_ids, cfg, progress=False)
    return heads.eval(), result.step_losses


@torch.no_grad()
def head_agreement(model: GPT, heads: ExitHeads, ids: np.ndarray, block_size: int = 128) -> list[float]:
    """Per layer 1..L-1: the fraction of positions of ``ids`` (windows of ``block_size``, all layers run)
    where the exit head's argmax equals the final layer's."""
    n = (len(ids) - 1) // block_size
    x = torch.from_numpy(ids[: n * block_size].astype(np.int64)).view(n, block_size)
    states = model.hidden_states(x)
    final = model.head(states[-1]).argmax(dim=-1)
    return [round((heads.logits(layer, states[layer], model).argmax(dim=-1) == final).float().mean().item(), 4)
            for layer in range(1, model.config.n_layer)]


def _cache_key(mode: str) -> str:
    from impl.zoo import RECIPES as ZOO
    from impl.zoo.recipes import cache_key

    # what the heads are: their module, their training and its recipe, on top of bpe-base's own key
    h = hashlib.sha256(inspect.getsource(heads_module).encode())
    h.update(inspect.getsource(ExitDistiller).encode())
    h.update(inspect.getsource(train_heads).encode())
    h.update(json.dumps(RECIPES[mode], sort_keys=True).encode())
    h.update(cache_key(ZOO["bpe-base"]).encode())
    return h.hexdigest()


def build(mode: str = "full") -> tuple[ExitHeads, dict[str, Any]]:
    """Train exit heads for ``bpe-base`` with recipe ``RECIPES[mode]``; (heads, metadata)."""
    from impl import zoo

    t0 = time.perf_counter()
    model, tokenizer, meta = zoo.load("bpe-base")
    model = model.float()
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    recipe = RECIPES[mode]
    before = head_agreement(model, ExitHeads.for_model(model, recipe["rank"]), val_ids[:EVAL_TOKENS + 1])
    heads, losses = train_heads(model, train_ids, val_ids, **recipe)
    return heads, {"target": "bpe-base", "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                   "rank": recipe["rank"], "recipe": recipe, "step_losses": losses,
                   "heldout_agreement_untrained": before,
                   "heldout_agreement": head_agreement(model, heads, val_ids[:EVAL_TOKENS + 1]),
                   "build_s": round(time.perf_counter() - t0, 1)}


def cache_name(quick: bool = False) -> str:
    """The model cache entry of the full or the quick heads."""
    return CACHE_NAME + ("-quick" if quick else "")


def load(quick: bool = False) -> tuple[GPT, ExitHeads, dict[str, Any]]:
    """(bpe-base in fp32, its exit heads, their metadata), training the heads first when not cached."""
    from impl import zoo

    model, _, _ = zoo.load("bpe-base")
    heads, meta = model_cache.get(cache_name(quick))
    return model.float().eval(), heads.float().eval(), meta


for _mode, _quick in (("full", False), ("quick", True)):
    if cache_name(_quick) not in model_cache.registered():
        model_cache.register(
            cache_name(_quick), lambda mode=_mode: build(mode),
            make_model=lambda meta: ExitHeads(meta["n_layer"], meta["n_embd"], meta["rank"]),
            description=f"early-exit heads on bpe-base (P27), {_mode} recipe, body frozen",
            key=lambda mode=_mode: _cache_key(mode))
