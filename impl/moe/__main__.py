"""``python -m impl.moe``: train a few steps of the shared GPT with MoE feed-forward layers.

Under ``torchrun`` the experts are sharded over the ranks (expert parallelism, all-to-all dispatch) and every
other weight is data parallel (gradients summed over the ranks); each rank prints its figures, rank 0 a summary.
Started plainly, it runs the same steps in one process with every expert.

    torchrun --standalone --nproc-per-node 2 -m impl.moe --experts 4 --top-k 2 --steps 5
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from impl.moe.layer import MoE, MoESettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m impl.moe",
        description="Train a few steps of the shared GPT with Mixture-of-Experts FFNs. Under torchrun the experts "
                    "are split over the ranks (expert parallel, all-to-all over torch.distributed: gloo on CPU, "
                    "NCCL on GPUs); without torchrun one process holds every expert.")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer (divisible by the world size)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="capacity factor (0: no token dropped)")
    p.add_argument("--alpha", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--block-size", type=int, default=64, help="tokens per sequence")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", choices=["bpe-base", "random"], default="bpe-base",
                   help="train tokens: bpe-base's training split (model cache) or uniform random ids (vocab 256)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (the same on every rank)")
    return p.parse_args(argv)


def _tokens(data: str) -> tuple[np.ndarray, int]:
    if data == "random":
        return np.random.default_rng(0).integers(0, 256, 200_000).astype(np.uint16), 256
    from impl import zoo

    base, tokenizer, meta = zoo.load("bpe-base")
    train_ids, _ = zoo.token_splits(tokenizer, meta)
    return train_ids, base.config.vocab_size


def main(argv: list[str] | None = None) -> int:
    """Run the steps; returns the exit status."""
    args = parse_args(argv)
    from impl.data.tokens import random_batch
    from impl.gpt.model import GPT, GPTConfig, lm_loss
    from impl.moe import expert_parallel

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if distributed:
        from impl.distributed import init_from_env

        info = init_from_env()
        rank, world, device = info.rank, info.world_size, info.device
    else:
        rank, world, device = 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids, vocab = _tokens(args.data)
    settings = MoESettings(args.experts, args.top_k, args.capacity_factor or None, alpha=args.alpha)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(GPTConfig(vocab_size=vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                          n_embd=args.n_embd, ffn=settings.name()))
    replicated = expert_parallel.shard(model, rank, world) if distributed else list(model.parameters())
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches (data parallel)
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    lo, hi = rank * args.experts // world, (rank + 1) * args.experts // world
    t0, tokens = time.perf_counter(), 0
    for step in range(args.steps):
        x, y = random_batch(ids, args.batch_size, args.block_size, gen)
        x, y = x.to(device), y.to(device)
        lm = lm_loss(model(x), y)
        aux = model.aux_loss()
        ((lm + aux) / world).backward()  # the objective: the mean of the ranks' losses
        if distributed:
            expert_parallel.reduce_replicated(replicated)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
        load = torch.stack([m.last_load for m in moe_layers]).sum(0).to(device)  # what this rank sent, per expert
        if distributed:
            dist.all_reduce(load)  # what every expert received
        print(f"rank {rank}/{world} step {step}: loss {lm.item():.4f} aux {aux.item():.5f} "
              f"experts {lo}-{hi - 1} ran {load[lo:hi].tolist()} token-assignments", flush=True)
    wall = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in model.parameters())
    print(f"rank {rank}/{world}: {tokens / wall:.0f} tokens/s, {n_params} parameters held "
          f"(experts {lo}-{hi - 1} of {args.experts}), peak RSS {peak_mib:.0f} MiB", flush=True)
    figures = torch.tensor([tokens / wall, lm.item()], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(figures)
    if rank == 0:
        print(f"summary: {world} rank(s), {settings.name()}, {args.steps} steps, {figures[0].item():.0f} tokens/s "
              f"in all, mean last loss {figures[1].item() / world:.4f}", flush=True)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
