"""``python -m impl.pretrain prepare|train|sample``: tokenize a corpus into memory-mapped token
files, pre-train a GPT on them (mixed precision, gradient checkpointing, resumable), sample."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

from impl.data.corpus import CorpusNotFound, cache_dir
from impl.pretrain.config import PRESETS, shape_of, train_preset
from impl.train.loop import DTYPES, TrainConfig

MODEL_OPTIONS = ("n_layer", "n_head", "n_embd", "block_size", "dropout")
TRAIN_SKIP = {"block_size", "dtype", "tensorboard"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m impl.pretrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    runs = cache_dir() / "pretrain" / "runs"
    presets = {name: train_preset(name) for name in PRESETS}

    p = sub.add_parser("prepare", help="tokenize a corpus with our BPE into uint16 train.bin / val.bin")
    p.add_argument("--corpus", default="shakespeare",
                   help="shakespeare (default), wikitext-103 (online; offline falls back), or a text file")
    p.add_argument("--tokenizer", default=None, help="BPE tokenizer file (default: project 2's 10K BPE)")
    p.add_argument("--data", default=None,
                   help="output directory (default: $HANDSON_CACHE/pretrain/<corpus>-<tokenizer hash>)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=None, help="keep only the first N characters")
    p.add_argument("--force", action="store_true", help="re-encode even if cached")

    t = sub.add_parser("train", help="pre-train a GPT on prepared token files")
    t.add_argument("--preset", choices=PRESETS, default="small",
                   help="small: 4x128, block 128 (5 CPU minutes); 125m: 12x896, block 1024 (default: small)")
    t.add_argument("--data", default=None, help="prepared token directory (default: prepare --corpus now)")
    t.add_argument("--corpus", default="shakespeare", help="corpus to prepare when --data is not given")
    t.add_argument("--out", default=None, help=f"run directory (default: {runs}/<preset>)")
    t.add_argument("--resume", action="store_true", help="continue bit-exactly from OUT/last.safetensors")
    t.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in backward (default: on for 125m, off for small)")
    t.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast precision; fp16 adds a GradScaler (default: bf16)")
    t.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    for name in MODEL_OPTIONS:
        defaults = ", ".join(f"{p}: {getattr(m, name)}" for p, (m, _) in presets.items())
        t.add_argument(_flag(name), type=float if name == "dropout" else int, default=None,
                       help=f"model shape ({defaults})")
    for f in fields(TrainConfig):
        if f.name not in TRAIN_SKIP:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            defaults = ", ".join(f"{p}: {getattr(c, f.name)}" for p, (_, c) in presets.items())
            t.add_argument(_flag(f.name), type=kind, default=None, help=f"({defaults})")

    s = sub.add_parser("sample", help="generate text from a pre-trained checkpoint")
    s.add_argument("--out", default=str(runs / "small"), help="run directory (default: %(default)s)")
    s.add_argument("--which", choices=("best", "last"), default="best")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--tokens", type=int, default=100, help="tokens to generate (default: 100)")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=50, help="(default: 50)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    return parser


def _train(args: argparse.Namespace) -> int:
    from impl.pretrain.config import param_count
    from impl.pretrain.data import load_token_files, prepare
    from impl.pretrain.train import pretrain

    tokens = load_token_files(args.data) if args.data else prepare(args.corpus)
    model_cfg, train_cfg = train_preset(args.preset)
    model_cfg = replace(model_cfg, vocab_size=tokens.vocab_size,
                        **{n: getattr(args, n) for n in MODEL_OPTIONS if getattr(args, n) is not None})
    if args.gradient_checkpointing is not None:
        model_cfg.gradient_checkpointing = args.gradient_checkpointing
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in ("block_size", "tensorboard") and getattr(args, f.name, None) is not None}
    train_cfg = replace(train_cfg, **given, block_size=model_cfg.block_size, tensorboard=args.tensorboard)
    print(f"{param_count(**shape_of(model_cfg)):,} parameters; {len(tokens.train):,} train tokens from "
          f"{tokens.directory}; dtype {train_cfg.dtype}, checkpointing {model_cfg.gradient_checkpointing}")
    out = args.out or str(cache_dir() / "pretrain" / "runs" / args.preset)
    model, result = pretrain(tokens, model_cfg, train_cfg, out, args.resume, args.device)
    print(f"{result.iters} iters in {result.wall_s:.1f} s ({result.tokens_per_s:,.0f} tokens/s); val loss "
          f"{result.final_val_loss:.4f} (best {result.best_val_loss:.4f}); run in {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from impl.bpe import load
    from impl.pretrain.train import load_pretrained, sample_text

    model, meta = load_pretrained(args.out, args.which, args.device)
    tokenizer = load(meta["tokens"]["tokenizer"])
    print(args.prompt + sample_text(model, tokenizer, args.prompt, args.tokens, args.temperature,
                                    args.top_k, args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            from impl.pretrain.data import prepare

            files = prepare(args.corpus, args.tokenizer, args.data, args.val_fraction, args.max_chars,
                            args.force)
            print(f"{files.meta['train_tokens']:,} train + {files.meta['val_tokens']:,} val tokens "
                  f"(vocab {files.vocab_size:,}, corpus {files.meta['corpus']}) in {files.directory}")
            return 0
        return _train(args) if args.command == "train" else _sample(args)
    except (CorpusNotFound, FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    return 1


if __name__ == "__main__":
    sys.exit(main())
