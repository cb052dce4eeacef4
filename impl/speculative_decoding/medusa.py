"""Multi-token prediction heads as the drafter (Medusa, Cai et al. 2024): no draft model at all.

Head i (0-based) reads the target's last hidden state at position t and predicts the token at
t + i + 2 (the target's own head predicts t + 1). Each head is one residual block on the hidden
state, h + SiLU(W_i h), followed by the target's frozen final LayerNorm and (tied) output head, as
Medusa-1 does; W_i starts at zero, so an untrained head starts as the target's next-token head.

Generation (greedy): one target forward per round scores the last emitted token and the heads'
proposals (a single candidate chain, the argmax of each head: Medusa's tree attention over several
candidates per head is left out), ``verify.greedy_accept`` keeps the matching prefix, and the
hidden state at the last kept position gives the next round's proposals, from the same forward.

The heads for ``bpe-base`` are trained briefly with the target frozen and cached through
``impl.model_cache`` under ``bpe-base-medusa`` (registered below, as ``impl.zoo`` registers "chat").
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
import torch.nn.functional as F

from impl import model_cache
from impl.gpt.model import GPT
from impl.kv_cache.fast import KVCache
from impl.speculative_decoding.fast import Speculation, Stats
from impl.speculative_decoding.verify import greedy_accept

CACHE_NAME = "bpe-base-medusa"
TRAINING = {"n_heads": 3, "steps": 300, "batch_size": 8, "block_size": 128, "learning_rate": 1e-3,
            "train_chars": 400_000, "seed": 0}


class MedusaHeads(nn.Module):
    """``n_heads`` residual blocks (C -> C) read through the target's own ``head``."""

    def __init__(self, n_embd: int, n_heads: int):
        super().__init__()
        self.res = nn.ModuleList(nn.Linear(n_embd, n_embd) for _ in range(n_heads))
        for lin in self.res:  # zero: each head starts as the target's next-token head
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def n_heads(self) -> int:
        return len(self.res)

    def forward(self, hidden: torch.Tensor, target: GPT) -> torch.Tensor:
        """Logits (..., n_heads, V) of tokens t + 2 .. t + n_heads + 1 from hidden states (..., C)."""
        return torch.stack([target.head(hidden + F.silu(lin(hidden))) for lin in self.res], dim=-2)


@torch.no_grad()
def medusa_generate(target: GPT, heads: MedusaHeads, prompt: torch.Tensor, max_new_tokens: int,
                    k: int | None = None) -> Speculation:
    """Greedy tokens (1, T + max_new_tokens) after ``prompt`` (1, T), drafted by the first ``k`` heads
    (default all) and verified in one target forward per round: exactly target-only greedy's."""
    T = prompt.shape[1]
    end = T + max_new_tokens
    if end > target.config.block_size:
        raise ValueError(f"prompt + new tokens = {end} exceeds the target's block_size {target.config.block_size}")
    k = heads.n_heads if k is None else min(k, heads.n_heads)
    stats = Stats()
    if max_new_tokens == 0:
        return Speculation(prompt.clone(), stats)
    cache = KVCache.for_model(target, 1, end)
    hidden = target.hidden_states(prompt, cache=cache)[-1][0, -1:]  # (1, C): the prompt's last position
    tokens = prompt[0].tolist() + [int(target.head(hidden).argmax())]
    stats.target_forwards += 1
    proposals = heads(hidden, target)[0].argmax(dim=-1)  # (n_heads,): tokens after the one just emitted
    while len(tokens) < end:
        n = len(tokens)
        kk = min(k, end - n - 1)
        drafts = proposals[:kk]
        fed = torch.cat([torch.tensor([tokens[-1]], device=prompt.device), drafts]).unsqueeze(0)  # (1, kk + 1)
        hidden = target.hidden_states(fed, cache=cache)[-1][0]  # (kk + 1, C): ONE forward
        new = greedy_accept(target.head(hidden), drafts)
        n_acc = len(new) - 1
        tokens += new
        cache.truncate(n + n_acc)
        proposals = heads(hidden[n_acc:n_acc + 1], target)[0].argmax(dim=-1)  # from the same forward
        stats.target_forwards += 1
        stats.rounds += 1
        stats.drafted += kk
        stats.accepted += n_acc
        stats.ks.append(kk)
    return Speculation(torch.tensor([tokens], device=prompt.device), stats)


def train_heads(target: GPT, ids: np.ndarray, n_heads: int, steps: int, batch_size: int, block_size: int,
                learning_rate: float, seed: int = 0) -> tuple[MedusaHeads, list[dict[str, float]]]:
    """Heads trained on ``ids`` with the target frozen: head i's cross-entropy on the token i + 2 ahead,
    summed over heads, AdamW; returns the heads (eval mode) and the loss every 50 steps."""
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    target.requires_grad_(False)
    heads = MedusaHeads(target.config.n_embd, n_heads)
    opt = torch.optim.AdamW(heads.parameters(), lr=learning_rate, weight_decay=0.0)
    data = torch.from_numpy(ids.astype(np.int64))
    history = []
    for step in range(steps):
        starts = gen.integers(0, len(data) - block_size - n_heads - 1, batch_size)
        x = torch.stack([data[s:s + block_size + n_heads + 1] for s in starts])  # (B, block + n_heads + 1)
        with torch.no_grad():
            hidden = target.hidden_states(x[:, :block_size])[-1]  # (B, block, C), frozen
        logits = heads(hidden, target)  # (B, block, n_heads, V)
        losses = [F.cross_entropy(logits[:, :, i].reshape(-1, logits.shape[-1]),
                                  x[:, i + 2:i + 2 + block_size].reshape(-1)) for i in range(n_heads)]
        loss = torch.stack(losses).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, **{f"head{i}": round(v.item(), 4) for i, v in enumerate(losses)}})
    return heads.eval(), history


def _cache_key() -> str:
    from impl.zoo import RECIPES
    from impl.zoo.recipes import cache_key

    # what the heads are: their class, their training and its settings (not the generation code below)
    h = hashlib.sha256(inspect.getsource(MedusaHeads).encode())
    h.update(inspect.getsource(train_heads).encode())
    h.update(inspect.getsource(build).encode())
    h.update(json.dumps(TRAINING, sort_keys=True).encode())
    h.update(cache_key(RECIPES["bpe-base"]).encode())
    return h.hexdigest()


def build() -> tuple[MedusaHeads, dict[str, Any]]:
    """Train the heads for ``bpe-base`` on the first ``train_chars`` of its training text; (heads, metadata)."""
    from impl import zoo
    from impl.data.corpus import load_text, split_text

    t0 = time.perf_counter()
    target, tokenizer, meta = zoo.load("bpe-base")
    recipe = zoo.RECIPES["bpe-base"]
    train_text, _ = split_text(load_text(recipe.corpus), recipe.val_fraction)
    ids = np.asarray(tokenizer.encode_ordinary(train_text[:TRAINING["train_chars"]]), dtype=np.int64)
    cfg = {k: v for k, v in TRAINING.items() if k != "train_chars"}
    heads, history = train_heads(target, ids, **cfg)
    return heads, {"target": "bpe-base", "n_embd": target.config.n_embd, "training": TRAINING,
                   "train_tokens": len(ids), "loss_curve": history, "build_s": round(time.perf_counter() - t0, 1)}


def load() -> tuple[GPT, MedusaHeads, dict[str, Any]]:
    """(bpe-base, its trained heads, the heads' metadata), building the heads first if not cached."""
    from impl import zoo

    target, _, _ = zoo.load("bpe-base")
    heads, meta = model_cache.get(CACHE_NAME)
    return target, heads, meta


def greedy(target_config: dict, target_state: dict, draft_config: dict, draft_state: dict,
           prompt: torch.Tensor, max_new_tokens: int, k: int) -> torch.Tensor:
    """The check's contract: greedy tokens with ``max(k, 1)`` untrained heads (seeded random residual
    weights, small enough that proposals often match the target's) as the drafter; the draft model of
    the case is not used."""
    target = GPT.from_state(target_config, target_state)
    gen = torch.Generator().manual_seed(k)
    heads = MedusaHeads(target.config.n_embd, max(k, 1))
    with torch.no_grad():
        for lin in heads.res:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.05)
    return medusa_generate(target, heads.eval(), prompt, max_new_tokens).tokens


if CACHE_NAME not in model_cache.registered():
    model_cache.register(CACHE_NAME, build, make_model=lambda meta: MedusaHeads(meta["n_embd"],
                                                                                meta["training"]["n_heads"]),
                         description="Medusa heads on bpe-base (P11's second drafter), target frozen", key=_cache_key)
