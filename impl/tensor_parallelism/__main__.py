"""Train a few steps of the shared GPT with Megatron tensor parallelism, one process per rank, under torchrun.

    torchrun --standalone --nproc-per-node 2 -m impl.tensor_parallelism --steps 5
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from impl.data.tokens import random_batch
from impl.distributed import init_from_env
from impl.gpt.model import GPT, GPTConfig
from impl.tensor_parallelism.shard import build_shard, param_bytes, shard_gpt
from impl.tensor_parallelism.train import comm_formula, optimizer, train_step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m impl.tensor_parallelism",
        description="Tensor-parallel (Megatron-LM) training steps of the shared GPT. Start one process per rank "
                    "with torchrun, e.g. `torchrun --standalone --nproc-per-node 2 -m impl.tensor_parallelism`; "
                    "n_head, 4 * n_embd and the vocabulary must divide by the number of ranks.")
    p.add_argument("--model", choices=["bpe-base", "random"], default="bpe-base",
                   help="bpe-base: the trained model and its train tokens (needs the model cache); random: a fresh "
                        "GPT of the shape below on random tokens, each rank building only its own shard")
    p.add_argument("--n-layer", type=int, default=2, help="random model: layers (default 2)")
    p.add_argument("--n-head", type=int, default=4, help="random model: attention heads (default 4)")
    p.add_argument("--n-embd", type=int, default=64, help="random model: width (default 64)")
    p.add_argument("--vocab-size", type=int, default=256, help="random model: vocabulary (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--steps", type=int, default=3, help="AdamW steps (default 3)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the random model (default 0)")
    return p.parse_args(argv)


def _model_and_data(args, rank: int, world: int, device: torch.device) -> tuple[GPT, np.ndarray]:
    if args.model == "bpe-base":
        from impl import zoo

        full, tokenizer, meta = zoo.load("bpe-base")
        train_ids, _ = zoo.token_splits(tokenizer, meta)
        return shard_gpt(full.float().train(), rank, world).to(device), train_ids
    cfg = GPTConfig(vocab_size=args.vocab_size, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd)
    tokens = np.random.default_rng(args.seed).integers(0, args.vocab_size, 1 << 16)
    return build_shard(cfg, rank, world, seed=args.seed, device=device).train(), tokens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        info = init_from_env()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model, ids = _model_and_data(args, info.rank, info.world_size, info.device)
    opt = optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)  # the same batches on every rank: TP splits the model, not the data
    B, T = args.batch_size, min(args.seq_len, model.config.block_size)
    losses, step_s, comm_bytes = [], [], 0
    for _ in range(args.steps):
        x, y = random_batch(ids, B, T, gen)
        t0 = time.perf_counter()
        _, loss, log = train_step(model, opt, x.to(info.device), y.to(info.device))
        step_s.append(time.perf_counter() - t0)
        losses.append(loss.item())
        comm_bytes = log.bytes
    formula = comm_formula(model.config, B, T)
    print(f"[rank {info.rank}/{info.world_size}] {info.device}: parameters {param_bytes(model) / 2**20:.2f} MiB, "
          f"all-reduced {comm_bytes} bytes/step (formula {formula['bytes']}), "
          f"step {1000 * sum(step_s) / len(step_s):.0f} ms, loss {losses[-1]:.4f}", flush=True)
    dist.barrier()
    if info.rank == 0:
        timed = step_s[1:] or step_s
        print(f"summary: {info.world_size}-way tensor parallel, {args.model} ({model.config.n_layer} layers, "
              f"{model.config.n_embd} wide), {args.steps} steps of {B} x {T} tokens: loss "
              f"{' -> '.join(f'{x:.4f}' for x in losses)}, {B * T * len(timed) / sum(timed):.0f} tokens/s", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
