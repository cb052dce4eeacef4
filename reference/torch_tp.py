"""Peer: PyTorch's own tensor parallelism (``torch.distributed.tensor.parallel``, DTensor) on the shared GPT.

``parallelize_module`` with ``ColwiseParallel`` on ``c_attn`` / ``c_fc`` and ``RowwiseParallel`` on the two
``c_proj``: the Megatron layout, expressed by PyTorch. ColwiseParallel splits the output features into
contiguous blocks, which for the fused ``[q; k; v]`` rows would hand rank 0 all of q and half of k; so the
rows are first permuted to rank-major ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]`` (rank r's heads of each of q, k,
v), making each contiguous block a valid ``[q_r; k_r; v_r]``; the permutation is undone when the weights
are read back. The token embedding and the tied head stay replicated here (DTensor's vocab-parallel
embedding and a loss-parallel head exist too; this peer keeps to the block layers).
Shares no code with ``impl.tensor_parallelism``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from impl.distributed import spawn
from impl.gpt.model import GPT


def _rank_major_rows(n_embd: int, n_head: int, world: int) -> torch.Tensor:
    """Row order of the fused c_attn that puts each rank's q, k, v heads next to each other."""
    per_rank = n_embd // world  # q (or k, v) rows of one rank: its n_head / world heads
    return torch.cat([torch.arange(block * n_embd + r * per_rank, block * n_embd + (r + 1) * per_rank)
                      for r in range(world) for block in range(3)])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _rank(rank: int, world: int, config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor,
          targets: torch.Tensor, lr: float) -> dict[str, Any]:
    model = GPT.from_state(config, state).train()
    order = _rank_major_rows(model.config.n_embd, model.config.n_head, world)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_attn.weight.copy_(block.attn.c_attn.weight[order])
            if block.attn.c_attn.bias is not None:
                block.attn.c_attn.bias.copy_(block.attn.c_attn.bias[order])
    mesh = init_device_mesh("cpu", (world,))
    plan = {}
    for i in range(len(model.blocks)):
        plan |= {f"blocks.{i}.attn.c_attn": ColwiseParallel(), f"blocks.{i}.attn.c_proj": RowwiseParallel(),
                 f"blocks.{i}.mlp.c_fc": ColwiseParallel(), f"blocks.{i}.mlp.c_proj": RowwiseParallel()}
    parallelize_module(model, mesh, plan)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, foreach=False)
    logits = model(idx)  # (B, T, V): the head is replicated
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    back = torch.argsort(order)
    for d in (grads, after):
        for n in d:
            if n.endswith("attn.c_attn.weight") or n.endswith("attn.c_attn.bias"):
                d[n] = d[n][back]
    return {"logits": _full(logits).detach(), "loss": loss.detach(), "grads": grads, "weights_after": after}


def tp_step(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor,
            lr: float = 1e-2, world: int = 2) -> dict[str, Any]:
    """One AdamW step of the GPT under DTensor tensor parallelism on ``world`` gloo ranks: logits, loss,
    full gradients and weights after the step by parameter name (rank 0's view)."""
    return spawn(_rank, world, config, state, idx, targets, lr, timeout_s=120)[0]
