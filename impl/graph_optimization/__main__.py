"""Export a cached model to ONNX, then optimize the graphs at every ORT level and count their nodes.

    python -m impl.graph_optimization export bpe-base --out /tmp/bpe-base-onnx
    python -m impl.graph_optimization levels /tmp/bpe-base-onnx

``export`` writes ``prefill.onnx`` and ``decode.onnx`` (dynamic batch, length and past length) into
``--out``; ``levels`` optimizes every ``*.onnx`` graph there (not the saved optimized ones) at each level,
saves the optimized graphs under ``DIR/optimized/`` and prints the node counts, totals and by op type.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from impl import zoo
from impl.graph_optimization.export import export_graph
from impl.graph_optimization.ort import LEVELS, level_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m impl.graph_optimization", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write prefill.onnx and decode.onnx of a zoo model")
    ex.add_argument("model", help="zoo model name (bpe-base, char, ...)")
    ex.add_argument("--out", required=True, type=Path, help="directory for the .onnx files")
    ex.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                    help="torch.export + onnxscript, or the legacy TorchScript tracer")
    ex.add_argument("--static", action="store_true", help="fixed shapes (batch 2 x 5, decode after 7 tokens)")
    lv = sub.add_parser("levels", help="optimize every graph in DIR at each ORT level; print node counts")
    lv.add_argument("dir", type=Path)
    lv.add_argument("--json", action="store_true", help="print the whole report as JSON")
    return p


def export(args: argparse.Namespace) -> int:
    model, _, _ = zoo.load(args.model)
    for kind in ("prefill", "decode"):
        start = time.perf_counter()
        path = export_graph(model, args.out / f"{kind}.onnx", kind, dynamic=not args.static, exporter=args.exporter)
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB, {args.exporter} exporter, "
              f"{time.perf_counter() - start:.1f} s")
    return 0


def levels(args: argparse.Namespace) -> int:
    graphs = sorted(p for p in args.dir.glob("*.onnx"))
    if not graphs:
        print(f"no .onnx files in {args.dir}: run `python -m impl.graph_optimization export MODEL --out {args.dir}`",
              file=sys.stderr)
        return 2
    reports = {p.name: level_report(p, args.dir / "optimized") for p in graphs}
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    for name, report in reports.items():
        print(f"\n{name}: nodes per level (the exported graph, then ORT's optimized graph)")
        columns = ["exported", *LEVELS]
        ops = sorted({op for entry in report.values() for op in entry["by_op"]})
        print(f"{'op':<34}" + "".join(f"{c:>12}" for c in columns))
        print(f"{'total':<34}" + "".join(f"{report[c]['total']:>12}" for c in columns))
        for op in ops:
            print(f"{op:<34}" + "".join(f"{report[c]['by_op'].get(op, 0):>12}" for c in columns))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return export(args) if args.command == "export" else levels(args)


if __name__ == "__main__":
    raise SystemExit(main())
