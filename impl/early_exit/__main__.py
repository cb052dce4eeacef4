"""``python -m impl.early_exit``: greedy generation from bpe-base with early exit at a threshold; prints
the text, the exit-layer histogram, the per-step agreement with the full model and both speeds.

    python -m impl.early_exit --prompt "ROMEO:" --threshold 0.3 --tokens 64
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from impl.early_exit import fast
from impl.early_exit.heads import MEASURES
from impl.early_exit.train import load
from impl.kv_cache.fast import generate as full_generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m impl.early_exit",
                                description="Greedy generation from bpe-base with confidence-based early exit "
                                            "(exit heads trained and cached on first use, about 2 minutes).")
    p.add_argument("--prompt", default="ROMEO:", help="text to continue")
    p.add_argument("--threshold", type=float, default=0.3, help="exit when confidence >= this (above 1: never)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens")
    p.add_argument("--measure", choices=MEASURES, default="max_prob", help="confidence measure")
    p.add_argument("--check-every", type=int, default=3, help="ask the exit head after every k-th layer")
    p.add_argument("--quick", action="store_true", help="use the quick heads (40 training steps)")
    return p.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    """Generate and report; returns the exit status."""
    args = parse_args(argv)
    from impl import zoo

    torch.set_num_threads(1)
    model, heads, _ = load(args.quick)
    _, tokenizer, _ = zoo.load("bpe-base")
    prompt = torch.tensor([tokenizer.encode_ordinary(args.prompt)], dtype=torch.long)
    L = model.config.n_layer
    t0 = time.perf_counter()
    out = fast.generate(model, heads, prompt, args.tokens, args.threshold, args.measure, args.check_every)
    t_exit = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = full_generate(model, prompt, args.tokens)
    t_full = time.perf_counter() - t0
    T = prompt.shape[1]
    agree = (model(out.tokens[:, :-1])[0, T - 1:].argmax(dim=-1) == out.new_tokens[0]).float().mean().item()
    print(tokenizer.decode(out.tokens[0].tolist()))
    print("---")
    hist = Counter(out.exit_layers.tolist())
    for layer in range(1, L + 1):
        print(f"exit after layer {layer}: {hist.get(layer, 0):4d} {'#' * hist.get(layer, 0)}")
    print(f"mean blocks run {out.exit_layers.float().mean().item():.2f} of {L}; per-step agreement with the full "
          f"model {agree:.3f}; free-running {(full[0, T:] == out.new_tokens[0]).float().mean().item():.3f}")
    print(f"early exit {args.tokens / t_exit:.0f} tokens/s, full model {args.tokens / t_full:.0f} tokens/s "
          "(one run each, one thread: a rough figure)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
