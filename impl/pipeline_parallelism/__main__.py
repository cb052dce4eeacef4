"""Train the shared GPT for a few steps with pipeline parallelism, one stage per process, under torchrun.

    torchrun --standalone --nproc-per-node 2 -m impl.pipeline_parallelism --schedule 1f1b --micro-batches 8

Every rank builds the same model (a seeded random GPT, or a zoo model's weights), keeps only its stage, and
runs ``--steps`` AdamW steps of ``--micro-batches`` micro-batches. Each rank prints its stage, its busy time
and its resident peak; rank 0 prints the losses, the measured bubble fraction beside (p - 1) / (m + p - 1),
and whether the tied embedding / LM head copies on the first and last rank are still identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.distributed as dist

from impl.distributed import init_from_env, resident_peak_bytes
from impl.gpt.model import GPT, GPTConfig
from impl.pipeline_parallelism.partition import (
    build_stage,
    flop_costs,
    measured_costs,
    parameter_costs,
    partition,
)
from impl.pipeline_parallelism.runtime import pipeline_step
from impl.pipeline_parallelism.schedules import SCHEDULES, bubble_fraction, ideal_bubble


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m impl.pipeline_parallelism",
        description="Pipeline-parallel training steps of the shared GPT (one stage per rank; GPipe or 1F1B). "
                    "Run under torchrun, e.g. `torchrun --standalone --nproc-per-node 2 -m "
                    "impl.pipeline_parallelism`.")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b", help="micro-batch schedule")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches m per step (default 4)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="rows per micro-batch (default 2)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (a seeded random 4-layer GPT, vocab 256, width 64) or a zoo model name "
                             "such as bpe-base (its weights and vocabulary; random tokens either way)")
    parser.add_argument("--balance", choices=["flops", "params", "measured"], default="flops",
                        help="balance the stages by multiply-accumulates per token (default), parameter count, "
                             "or measured forward + backward time (measured on rank 0, broadcast)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    return parser.parse_args(argv)


def build_model(name: str, seq_len: int) -> GPT:
    """The same model on every rank: a seeded random GPT, or a zoo model in fp32."""
    if name == "tiny":
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=256, block_size=max(seq_len, 64), n_layer=4, n_head=4, n_embd=64))
    from impl import zoo

    model, _, _ = zoo.load(name)
    if seq_len > model.config.block_size:
        raise SystemExit(f"--seq-len {seq_len} exceeds {name}'s block_size {model.config.block_size}")
    return model.float()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = init_from_env()
    rank, world = info.rank, info.world_size
    torch.manual_seed(0)
    model = build_model(args.model, args.seq_len)
    batch = args.micro_batches * args.micro_batch_size
    data = torch.Generator().manual_seed(1)
    if args.balance == "measured":  # measured on rank 0 and broadcast: every rank must agree on the split
        costs = torch.tensor(measured_costs(model, torch.zeros(args.micro_batch_size, args.seq_len, dtype=torch.long))
                             if rank == 0 else [0.0] * (len(model.blocks) + 2), dtype=torch.float64)
        dist.broadcast(costs, src=0)
        ranges = partition(model, world, costs.tolist())
    elif args.balance == "params":
        ranges = partition(model, world, parameter_costs(model))
    else:
        ranges = partition(model, world, flop_costs(model, args.seq_len))
    stage = build_stage(model, ranges, rank).to(info.device)
    vocab = model.config.vocab_size
    del model
    optimizer = torch.optim.AdamW(stage.parameters(), lr=args.lr)
    losses, bubbles, busy = [], [], []
    peak = 0
    for _ in range(args.steps):
        ids = torch.randint(vocab, (batch, args.seq_len + 1), generator=data)  # the same on every rank
        optimizer.zero_grad(set_to_none=False)
        dist.barrier()
        out, step_peak = resident_peak_bytes(
            lambda ids=ids: pipeline_step(stage, args.schedule, ids[:, :-1], ids[:, 1:], args.micro_batches))
        optimizer.step()
        peak = max(peak, step_peak)
        everyone = [None] * world
        dist.all_gather_object(everyone, out["events"])
        events = sum(everyone, [])
        bubbles.append(bubble_fraction(events))
        busy.append(sum(e.end - e.start for e in out["events"]))
        if stage.is_last:
            losses.append(sum(out["losses"]) / args.micro_batches)
    n_params = sum(p.numel() for p in stage.parameters())
    print(f"rank {rank}: stage {rank} blocks {ranges[rank][0]}..{ranges[rank][1] - 1}, {n_params:,} parameters, "
          f"busy {1000 * statistics.median(busy):.1f} ms/step, resident peak {peak / 2**20:.1f} MiB", flush=True)
    tied_diff = _tied_copies_diff(stage, world)
    final = [losses]
    dist.broadcast_object_list(final, src=world - 1)
    if rank == 0:
        print(f"{args.schedule}, p = {world}, m = {args.micro_batches}: losses "
              f"{', '.join(f'{v:.4f}' for v in final[0])}; bubble fraction {statistics.median(bubbles):.3f} "
              f"(median of {args.steps} steps; formula (p - 1) / (m + p - 1) = "
              f"{ideal_bubble(world, args.micro_batches):.3f})")
        if tied_diff is not None:
            print(f"tied embedding / LM head copies (rank 0 vs rank {world - 1}): max |difference| {tied_diff:.3g}")
    dist.destroy_process_group()
    return 0


def _tied_copies_diff(stage, world: int) -> float | None:
    """Max |wte on rank 0 - lm_head copy on the last rank| (rank 0 gets it; None without a tie)."""
    if not stage.tied:
        return None
    if stage.is_first:
        theirs = torch.empty_like(stage.wte.weight)
        dist.recv(theirs, src=world - 1)
        return (theirs - stage.wte.weight.detach()).abs().max().item()
    if stage.is_last:
        dist.send(stage.lm_head.weight.detach().contiguous(), dst=0)
    return None


if __name__ == "__main__":
    sys.exit(main())
