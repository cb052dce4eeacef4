"""``python -m impl.char_gpt train|sample``: train the character GPT and sample from it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from impl.data.corpus import CorpusNotFound, cache_dir
from impl.gpt.model import GPTConfig
from impl.train.checkpoint import CheckpointCorrupt
from impl.train.loop import TrainConfig


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    for f in fields(cls):
        if f.name in skip or f.type not in ("int", "float", "str"):
            continue
        kind = {"int": int, "float": float, "str": str}[f.type]
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                            help=f"(default: {f.default})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impl.char_gpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on a corpus (defaults: nanoGPT's shakespeare_char CPU recipe)")
    t.add_argument("--corpus", default="tinyshakespeare",
                   help="tinyshakespeare, shakespeare, or a path to a text file (default: tinyshakespeare)")
    t.add_argument("--out", default=str(cache_dir() / "char_gpt"), help="checkpoint directory (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue bit-exactly from OUT/last.safetensors (if it is absent or fails its hash: "
                        "one line says so, a corrupt file is moved aside, training starts from iteration 0)")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
    t.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                   help="biases in linear layers and layer norms (default: off, as in nanoGPT's train.py)")
    _add_dataclass_args(t, GPTConfig, {"vocab_size", "block_size", "attention"})
    _add_dataclass_args(t, TrainConfig, {"dtype"})
    s = sub.add_parser("sample", help="generate text from a trained checkpoint")
    s.add_argument("--out", default=str(cache_dir() / "char_gpt"), help="checkpoint directory (default: %(default)s)")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--chars", type=int, default=500, help="characters to generate (default: 500)")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=20, help="(default: 20)")
    s.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from impl.char_gpt.train import load_trained, prepare, sample, train_char_gpt

    if args.command == "train":
        try:
            data = prepare(args.corpus)
        except CorpusNotFound as e:
            parser.error(str(e))
        model_cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=args.block_size,
                              n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                              bias=args.bias)
        train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                                   if hasattr(args, f.name)})
        model, result = train_char_gpt(data, model_cfg, train_cfg, args.out, args.resume, device=args.device)
        print(f"{model.num_params():,} parameters; {result.iters} iters in {result.wall_s:.1f} s "
              f"({result.tokens_per_s:,.0f} tokens/s); val loss {result.final_val_loss:.4f} "
              f"(best {result.best_val_loss:.4f}); checkpoints in {args.out}")
        return 0
    try:
        model, tok = load_trained(args.out)
    except (FileNotFoundError, CheckpointCorrupt) as e:
        parser.error(f"{e}; train first with `python -m impl.char_gpt train --out {args.out}`")
    try:
        print(args.prompt + sample(model, tok, args.prompt, args.chars, args.temperature, args.top_k, args.seed))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
