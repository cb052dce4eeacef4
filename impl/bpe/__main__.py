"""Command line: ``python -m impl.bpe {train,encode,decode} --help``."""

from __future__ import annotations

import argparse
import sys

from impl.bpe.pipeline import (
    DEFAULT_CORPUS,
    DEFAULT_VOCAB_SIZE,
    default_path,
    default_tokenizer_path,
    heldout_text,
    train_tokenizer,
)
from impl.bpe.tokenizer import ENDOFTEXT, load


def _train(args: argparse.Namespace) -> None:
    specials = [] if args.no_special else (args.special or [ENDOFTEXT])
    tok, path = train_tokenizer(
        args.corpus, args.vocab_size, args.out, args.pattern, specials, args.trainer, progress=not args.quiet
    )
    meta = tok.metadata
    print(f"trained {tok!r} on {meta['corpus']} ({meta['train_chars']:,} characters)")
    print(f"merges learned in {meta['train_seconds']:.1f} s ({meta['total_seconds']:.1f} s with loading)")
    # after a WikiText fallback, measure on the fallback corpus without probing the Hub again
    held = heldout_text(args.corpus if meta["corpus"].startswith("wikitext") else meta["corpus"])
    if held:
        print(f"held-out bytes per token: {len(held.encode('utf-8')) / len(tok.encode_ordinary(held)):.3f}")
    print(f"saved to {path}")


def _tokenizer_path(args: argparse.Namespace) -> str:
    if args.tokenizer:
        return args.tokenizer
    if not default_path().is_file():
        print("no default tokenizer in the cache yet; training it (takes seconds)", file=sys.stderr)
    return str(default_tokenizer_path())


def _encode(args: argparse.Namespace) -> None:
    tok = load(_tokenizer_path(args))
    text = args.text if args.text is not None else sys.stdin.read()
    allowed = "all" if args.allow_special else "none_raise"
    try:
        ids = tok.encode(text, allowed_special=allowed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(" ".join(map(str, ids)))


def _decode(args: argparse.Namespace) -> None:
    tok = load(_tokenizer_path(args))
    words = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(w) for w in words]
        sys.stdout.write(tok.decode(ids))
    except ValueError as e:
        sys.exit(f"error: {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m impl.bpe", description="Byte-level BPE tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="learn merges on a corpus and save a tokenizer file")
    tr.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="total ids: 256 bytes + merges + special tokens (default %(default)s)",
    )
    tr.add_argument(
        "--corpus",
        default=DEFAULT_CORPUS,
        help="shakespeare (default), tinyshakespeare, wikitext, wikitext-2, or a text file path",
    )
    tr.add_argument("--pattern", default="gpt4", help="split regex: gpt4 (default), gpt2, or a regex")
    tr.add_argument(
        "--special",
        action="append",
        metavar="TOKEN",
        help=f"register a special token (repeatable; default {ENDOFTEXT})",
    )
    tr.add_argument("--no-special", action="store_true", help="register no special token")
    tr.add_argument(
        "--trainer",
        choices=["fast", "naive"],
        default="fast",
        help="fast (incremental counts, default) or naive (recount per merge: slow)",
    )
    tr.add_argument("--out", help="output file (default: $HANDSON_CACHE/bpe/<corpus>-<vocab>-<pattern>.json)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(run=_train)

    for name, helptext, run in (("encode", "text -> ids", _encode), ("decode", "ids -> text", _decode)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--tokenizer", help="tokenizer file (default: the 10K Shakespeare one, trained if missing)")
        if name == "encode":
            p.add_argument("text", nargs="?", help="text to encode (default: stdin)")
            p.add_argument(
                "--allow-special",
                action="store_true",
                help="encode special-token strings as special tokens instead of refusing them",
            )
        else:
            p.add_argument("ids", nargs="*", help="token ids (default: whitespace-separated on stdin)")
        p.set_defaults(run=run)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
