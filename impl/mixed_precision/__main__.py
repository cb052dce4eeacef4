"""``python -m impl.mixed_precision``: the FP32 / FP16 / BF16 table for one GPT (training step,
inference forward, weight and activation memory, loss and logit differences), and a bar chart."""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.workloads.mixed_precision import compare_precisions, format_table, plot_rows
from impl.mixed_precision.steps import PRECISIONS, Shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impl.mixed_precision", description=__doc__)
    default = Shape()
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(default, name),
                            help="(default: %(default)s)")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated subset of fp32,bf16,fp16 (default: fp32,bf16 on CPU, "
                             "where fp16 matmuls run up to ~100x slower than fp32; all three on CUDA)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--plot", default=None, help="save a bar chart of the times to this PNG")
    args = parser.parse_args(argv)

    chosen = args.precisions or ("fp32,bf16,fp16" if args.device == "cuda" else "fp32,bf16")
    precisions = tuple(p.strip() for p in chosen.split(",") if p.strip())
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision {', '.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    if args.n_embd % args.n_head:
        parser.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(args.n_layer, args.n_head, args.n_embd, args.block_size, args.batch_size)
    rows = compare_precisions(shape, precisions, args.rounds, args.device)
    threads = torch.get_num_threads()
    cpu = f"cpu, {threads} thread" + "s" * (threads != 1)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else cpu
    print(f"{shape} on {where}; medians of {args.rounds} interleaved rounds")
    print(format_table(rows))
    if args.plot:
        title = f"GPT {args.n_layer}x{args.n_embd}, batch {args.batch_size}x{args.block_size} ({where})"
        plot_rows(rows, args.plot, title)
        print(f"plot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
