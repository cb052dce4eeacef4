"""Turn a GPT into rank r's tensor-parallel shard by replacing modules, never by forking the model code.

Per block (Megatron's pairing: one all-reduce per direction per pair):
- attention: ``c_attn`` column-parallel by heads, ``c_proj`` row-parallel over the same heads' columns.
  ``c_attn``'s rows are the fused ``[q; k; v]``, each ``n_embd`` rows, head h owning rows
  ``h*hs .. (h+1)*hs`` of each block: rank r takes its heads' rows from *each* of q, k, v, so its local
  output is again ``[q_r; k_r; v_r]`` and the unchanged ``CausalSelfAttention`` (which reads its head
  count from ``c_attn.out_features``) runs ``n_head / p`` heads;
- MLP: ``c_fc`` column-parallel (rank r's 4C/p neurons), ``c_proj`` row-parallel over those neurons;
- token embedding / tied LM head: split by vocabulary rows (``VocabParallelEmbedding`` / ``VocabParallelHead``);
- replicated on every rank: LayerNorms, position embeddings, the row-parallel layers' biases.

Slicing uses ``narrow`` on spans, so it works on meta tensors too: ``build_shard`` makes a rank's shard
without ever holding the full model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from impl.gpt.model import GPT, GPTConfig
from impl.ptq.modules import linear_names, replace_module
from impl.tensor_parallelism.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
)

Spans = list[tuple[int, int]]  # (start, length) runs along one dimension, concatenated in order


@dataclass(frozen=True)
class TPInfo:
    """What a sharded GPT knows about its place: rank, world size, its vocabulary rows, its group."""

    rank: int
    world_size: int
    vocab_start: int
    vocab_local: int
    group: object = None


def take(t: torch.Tensor, dim: int, spans: Spans) -> torch.Tensor:
    """The runs ``spans`` of ``t`` along ``dim``, concatenated (a copy-free view for a single run)."""
    parts = [t.narrow(dim, start, length) for start, length in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def split(n: int, rank: int, world: int, what: str) -> Spans:
    """Rank ``rank``'s contiguous ``n / world`` of ``n`` (an error naming ``what`` if it does not divide)."""
    if n % world:
        raise ValueError(f"tensor parallelism over {world} ranks needs {what} ({n}) divisible by {world}")
    return [(rank * n // world, n // world)]


def qkv_spans(n_embd: int, head_dim: int, rank: int, world: int) -> Spans:
    """Rows of the fused ``c_attn`` holding rank ``rank``'s heads: the same heads' rows of q, of k and of v."""
    (start, length), = split(n_embd // head_dim, rank, world, "n_head")
    return [(block * n_embd + start * head_dim, length * head_dim) for block in range(3)]


def shard_spec(config: GPTConfig, name: str, rank: int, world: int) -> tuple[int, Spans] | None:
    """Where parameter ``name`` of the full GPT lives in rank ``rank``'s shard: ``(dim, spans)``, or
    ``None`` when every rank holds all of it (replicated)."""
    C, hs = config.n_embd, config.n_embd // config.n_head
    parts = name.split(".")
    if name in ("wte.weight", "lm_head.weight"):
        return 0, split(config.vocab_size, rank, world, "vocab_size")
    if parts[0] != "blocks":
        return None  # wpe, ln_f
    where, leaf = ".".join(parts[2:-1]), parts[-1]  # blocks.i.attn.c_attn.weight -> attn.c_attn, weight
    if where == "attn.c_attn":
        return 0, qkv_spans(C, hs, rank, world)
    if where == "attn.c_proj":  # its input columns are the heads' outputs, head-major
        if leaf != "weight":
            return None  # the row-parallel bias is replicated
        (start, length), = split(config.n_head, rank, world, "n_head")
        return 1, [(start * hs, length * hs)]
    if where == "mlp.c_fc":
        return 0, split(4 * C, rank, world, "4 * n_embd")
    if where == "mlp.c_proj":
        return (1, split(4 * C, rank, world, "4 * n_embd")) if leaf == "weight" else None
    return None  # layer norms


def shard_gpt(model: GPT, rank: int, world: int, group=None) -> GPT:
    """Replace ``model``'s linears, token embedding and LM head (in place) by rank ``rank``'s tensor-parallel
    shards over ``world`` ranks of ``group``; returns the model, whose ``forward`` then gives this rank's
    local logits (B, T, vocab / world) and whose ``tp`` attribute is a ``TPInfo``."""
    config = model.config
    if config.ffn != "mlp":
        raise ValueError(f"shard_gpt shards GPT-2's MLP; this model's ffn is {config.ffn!r}")
    tied = model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        for name in linear_names(model):  # blocks.i.attn.c_attn, blocks.i.attn.c_proj, blocks.i.mlp.c_fc, ...
            linear = model.get_submodule(name)
            dim, spans = shard_spec(config, f"{name}.weight", rank, world)
            if dim == 0:
                bias = None if linear.bias is None else take(linear.bias, 0, spans)
                layer: nn.Module = ColumnParallelLinear(take(linear.weight, 0, spans), bias, group)
            else:
                layer = RowParallelLinear(take(linear.weight, 1, spans), linear.bias, group)
            replace_module(model, name, layer)
        (start, length), = split(config.vocab_size, rank, world, "vocab_size")
        model.wte = VocabParallelEmbedding(take(model.wte.weight, 0, [(start, length)]), start, group)
        head = model.wte.weight if tied else take(model.lm_head.weight, 0, [(start, length)])
        model.lm_head = VocabParallelHead(head, start, group)
    model.tp = TPInfo(rank, world, start, length, group)
    return model


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters ``model`` really holds (a tied weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def per_rank_bytes_formula(model: GPT, world: int) -> dict[str, int]:
    """From the full model: bytes of the sharded parameters, of the replicated ones, and the per-rank
    figure ``sharded / world + replicated`` the shard should hold."""
    sharded = replicated = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if shard_spec(model.config, name, 0, world) is None:
            replicated += nbytes
        else:
            sharded += nbytes
    return {"sharded": sharded, "replicated": replicated, "per_rank": sharded // world + replicated}


def gather_full(config: GPTConfig, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of parameter ``name`` from every rank's shard of it (rank order); a replicated one
    is rank 0's copy."""
    world = len(shards)
    if shard_spec(config, name, 0, world) is None:
        return shards[0]
    dim, _ = shard_spec(config, name, 0, world)
    full_len = sum(s.shape[dim] for s in shards)
    shape = list(shards[0].shape)
    shape[dim] = full_len
    full = torch.full(shape, float("nan"), dtype=shards[0].dtype)  # an unwritten element stays NaN
    for rank, shard in enumerate(shards):
        _, spans = shard_spec(config, name, rank, world)
        offset = 0
        for start, length in spans:
            full.narrow(dim, start, length).copy_(shard.narrow(dim, offset, length))
            offset += length
    return full


def build_shard(config: GPTConfig, rank: int, world: int, seed: int = 0, group=None,
                device: str | torch.device = "cpu") -> GPT:
    """Rank ``rank``'s shard of a freshly initialised GPT, built on the meta device and materialised shard
    by shard (GPT-2's init: normal(0, 0.02) weights, zero biases, unit LayerNorms), so no rank ever holds
    the full model: how a model too large for one device starts. Ranks draw from different seeds."""
    with torch.device("meta"):
        model = GPT(config)
    shard_gpt(model, rank, world, group)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # to_empty makes a new Parameter per module: re-tie
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    return model
