"""A tensor-parallel training step for the shared GPT, and the single-process step it must equal.

``single_step`` and ``tp_step`` take the same arguments (a GPT's config and weights, a batch, a learning
rate) and return the same things: logits (B, T, V), the loss, every parameter's gradient and every weight
after one AdamW step, by parameter name. ``tp_step`` runs ``world`` ranks (``impl.distributed.spawn``) and
gathers their shards into full tensors, so the two answers compare element by element.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from impl.distributed import spawn
from impl.gpt.model import GPT, GPTConfig
from impl.tensor_parallelism.layers import CommLog, comm_log, vocab_parallel_cross_entropy
from impl.tensor_parallelism.shard import gather_full, shard_gpt

WEIGHT_DECAY = 0.1


def full_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), in fp32 or the logits' wider dtype."""
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, targets.reshape(-1))


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW on every parameter (element-wise, so each rank steps its own shard exactly as the full model)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, foreach=False)


def train_step(model: GPT, opt: torch.optim.Optimizer, idx: torch.Tensor, targets: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor, CommLog]:
    """One AdamW step of a sharded GPT: (local logits (B, T, V/p), loss, the collectives it issued)."""
    opt.zero_grad(set_to_none=True)
    with comm_log() as log:
        logits = model(idx)
        loss = vocab_parallel_cross_entropy(logits, targets, model.tp.vocab_start, model.tp.group)
        loss.backward()
    opt.step()
    return logits.detach(), loss.detach(), log


def single_step(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor,
                lr: float = 1e-2, world: int = 2) -> dict[str, Any]:
    """One AdamW step of the whole GPT in this process (``world`` is ignored: the reference has no ranks):
    logits (B, T, V), loss, gradients and weights after the step by parameter name."""
    model = GPT.from_state(config, state).train()
    opt = optimizer(model, lr)
    logits = model(idx)
    loss = full_cross_entropy(logits, targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads,
            "weights_after": {n: p.detach().clone() for n, p in model.named_parameters()}}


def tp_rank_step(rank: int, world: int, config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor,
                 targets: torch.Tensor, lr: float) -> dict[str, Any]:
    """Body of one rank of ``tp_step``: shard the GPT, take one step, return this rank's pieces."""
    model = shard_gpt(GPT.from_state(config, state).train(), rank, world)
    opt = optimizer(model, lr)
    opt.zero_grad(set_to_none=True)
    logits = model(idx)  # (B, T, V / world): this rank's vocabulary slice
    loss = vocab_parallel_cross_entropy(logits, targets, model.tp.vocab_start)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads,
            "weights_after": {n: p.detach().clone() for n, p in model.named_parameters()}}


def gather_step(config: dict[str, Any], per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Full logits (vocabulary slices concatenated in rank order), rank 0's loss, full gradients and weights."""
    cfg = GPTConfig(**config)
    return {
        "logits": torch.cat([r["logits"] for r in per_rank], dim=-1),
        "loss": per_rank[0]["loss"],
        **{key: {n: gather_full(cfg, n, [r[key][n] for r in per_rank]) for n in per_rank[0][key]}
           for key in ("grads", "weights_after")},
    }


def tp_step(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor,
            lr: float = 1e-2, world: int = 2, rank_fn: Callable[..., dict[str, Any]] = tp_rank_step) -> dict[str, Any]:
    """``single_step``'s answer computed by ``world`` tensor-parallel ranks (gloo, one thread each) and
    gathered; ``rank_fn`` is the per-rank body (a module-level function: it runs in fresh processes)."""
    return gather_step(config, spawn(rank_fn, world, config, state, idx, targets, lr, timeout_s=120))


def comm_formula(config: GPTConfig, batch: int, seq: int, element_bytes: int = 4) -> dict[str, int]:
    """Payload of the all-reduces of one training step, per rank: with N = batch * seq tokens, C = n_embd,
    L = n_layer: forward 2 per layer (attention and MLP outputs) + 1 (embedding) of N*C, backward 2 per layer
    (attention and MLP inputs) + 1 (LM head input) of N*C, and 3 of N for the vocab-parallel loss."""
    N, C, L = batch * seq, config.n_embd, config.n_layer
    calls = 4 * L + 2 + 3
    elements = (4 * L + 2) * N * C + 3 * N
    return {"calls": calls, "elements": elements, "bytes": elements * element_bytes}
