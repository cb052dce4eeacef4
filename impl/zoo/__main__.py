"""``python -m impl.zoo list|build NAME|verify [NAME ...]``: the zoo's trained base models.

  list          every registered model: cached, absent, stale (another recipe or other code built it)
                or corrupt, with its quality figures (held-out bits per byte, train time, tokens/s)
  build NAME    train NAME into the cache unless a valid, current entry exists (a stale or corrupt
                one is moved aside and rebuilt; waits if another process is building it)
  verify        check every entry on disk (or only NAMEs) against its manifest's sha256; exit 1 if
                one is corrupt

The cache lives in ``$HANDSON_CACHE/models`` (default ``~/.cache/handson-llm/models``).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from impl import model_cache
from impl.train.checkpoint import CheckpointCorrupt


def _figures(name: str) -> str:
    """One line of an entry's quality figures, or '' when it has none."""
    try:
        meta: dict[str, Any] = model_cache.metadata(name)
    except (FileNotFoundError, model_cache.CacheEntryCorrupt, CheckpointCorrupt):
        return ""
    parts = []
    if "heldout_bits_per_byte" in meta:
        parts.append(f"held-out {meta['heldout_bits_per_byte']:.3f} bits/byte")
    wiki = meta.get("wikitext2_test", {})
    if "bits_per_byte" in wiki:
        parts.append(f"WikiText-2 test {wiki['bits_per_byte']:.3f} bits/byte")
    if "parameters" in meta:
        parts.append(f"{meta['parameters'] / 1e6:.2f}M params")
    if "train_wall_s" in meta:
        parts.append(f"trained in {meta['train_wall_s']:.0f}s")
    if "tokens_per_s" in meta:
        parts.append(f"{meta['tokens_per_s']:,.0f} tokens/s")
    if "sft" in meta:  # a fine-tuned model (chat): its base and the fine-tuning run
        sft = meta["sft"]
        parts.append(f"{meta.get('base', '?')} fine-tuned {sft['steps']} steps in {sft['wall_s']:.0f}s "
                     f"({sft['tokens_per_s']:,.0f} tokens/s)")
    return ", ".join(parts)


def main(argv: list[str] | None = None, prog: str = "python -m impl.zoo") -> int:
    """Run the CLI; returns the exit status (1 when ``verify`` finds a corrupt entry)."""
    import impl.zoo  # noqa: F401  (registers the named recipes)

    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered model, its state (cached, absent, stale, corrupt) and figures")
    b = sub.add_parser("build", help="train NAME into the cache unless a valid, current entry exists (a stale or "
                                     "corrupt one is moved aside and rebuilt; waits if another process builds it)")
    b.add_argument("name")
    v = sub.add_parser("verify", help="check every entry on disk (or only NAMEs) against its manifest's "
                                      "sha256; exit 1 if one is corrupt")
    v.add_argument("names", nargs="*", metavar="NAME")
    args = parser.parse_args(argv)

    if args.command == "list":
        print(f"model cache: {model_cache.models_dir()}")
        for name, spec in sorted(model_cache.registered().items()):
            state = model_cache.state(name)
            print(f"  {name:<12} {state:<10} {spec.description}")
            figures = _figures(name) if state in ("cached", "stale") else ""
            if figures:
                print(f"  {'':<12} {'':<10} {figures}")
        return 0
    if args.command == "build":
        if args.name not in model_cache.registered():
            parser.error(f"no model named {args.name!r} is registered "
                         f"(registered: {', '.join(sorted(model_cache.registered()))})")
        before = model_cache.state(args.name)
        t0 = time.perf_counter()
        model, _ = model_cache.get(args.name)
        done = "was already cached" if before == "cached" else "built"
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.name}: {done} ({params:,} parameters) in {model_cache.entry_dir(args.name)} "
              f"[{time.perf_counter() - t0:.1f}s]")
        figures = _figures(args.name)
        if figures:
            print(f"{args.name}: {figures}")
        return 0
    names = args.names or model_cache.entries_on_disk()
    corrupt = 0
    for name in names:
        status = model_cache.state(name)
        corrupt += status.startswith("corrupt")
        print(f"{name}: {status}")
    if not names:
        print(f"no entries in {model_cache.models_dir()}")
    if corrupt:
        print(f"{corrupt} corrupt entr{'y' if corrupt == 1 else 'ies'}: `{prog} build NAME` "
              "moves a corrupt entry aside and rebuilds it", file=sys.stderr)
    return 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
