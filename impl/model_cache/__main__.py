"""``python -m impl.model_cache list|build NAME|verify [NAME ...]``: the shared model cache.

The cache lives in ``$HANDSON_CACHE/models`` (default ``~/.cache/handson-llm/models``).
"""

from __future__ import annotations

import argparse
import sys

from impl import model_cache


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (1 when ``verify`` finds a corrupt entry)."""
    parser = argparse.ArgumentParser(prog="python -m impl.model_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered model and whether it is cached, absent or corrupt")
    b = sub.add_parser("build", help="build NAME unless a valid entry exists (a corrupt one is moved aside "
                                     "and rebuilt; waits if another process is building it)")
    b.add_argument("name")
    v = sub.add_parser("verify", help="check every entry on disk (or only NAMEs) against its manifest's "
                                      "sha256; exit 1 if one is corrupt")
    v.add_argument("names", nargs="*", metavar="NAME")
    args = parser.parse_args(argv)

    if args.command == "list":
        print(f"model cache: {model_cache.models_dir()}")
        for name, spec in sorted(model_cache.registered().items()):
            print(f"  {name:<12} {model_cache.state(name):<10} {spec.description}")
        return 0
    if args.command == "build":
        if args.name not in model_cache.registered():
            parser.error(f"no model named {args.name!r} is registered "
                         f"(registered: {', '.join(sorted(model_cache.registered()))})")
        before = model_cache.state(args.name)
        model, _ = model_cache.get(args.name)
        done = "was already cached" if before == "cached" else "built"
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.name}: {done} ({params:,} parameters) in {model_cache.entry_dir(args.name)}")
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
        print(f"{corrupt} corrupt entr{'y' if corrupt == 1 else 'ies'}: `python -m impl.model_cache build NAME` "
              "moves a corrupt entry aside and rebuilds it", file=sys.stderr)
    return 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
