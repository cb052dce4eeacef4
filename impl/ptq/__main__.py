"""Quantize a cached model and report its size and held-out perplexity beside the full-precision one.

    python -m impl.ptq bpe-base --bits 8
    python -m impl.ptq bpe-base --bits 4 --group-size 128 --method gptq --act-order --out /tmp/bpe-base-gptq4
    python -m impl.ptq bpe-base --bits 4 --group-size 32 --lm-head      # the tied embedding/head too

The held-out text is the model's own (the 10% its build held out); GPTQ's calibration sequences come from
the training 90%. ``--out`` writes the quantized model as a directory (``impl.ptq.modules.load_quantized``
reads it back) and reports the file's size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from impl import zoo
from impl.ptq.modules import (
    linear_names,
    model_nbytes,
    quantization_meta,
    quantize_model,
    save_quantized,
    use_int8_matmul,
)
from impl.ptq.quant import Scheme
from impl.train.evaluate import full_split_loss, perplexity


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m impl.ptq", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="zoo model name (bpe-base, char, ...) or saved model directory")
    p.add_argument("--bits", type=int, default=8, help="weight bits, 2..8")
    p.add_argument("--group-size", type=int, default=None, help="weights per scale along the input dim "
                   "(default: one scale per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid (a zero point per group)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="round to nearest, or GPTQ")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--calib-samples", type=int, default=128, help="GPTQ: calibration sequences from the train split")
    p.add_argument("--lm-head", action="store_true", help="quantize the LM head (and the embedding tied to it)")
    p.add_argument("--int8-matmul", action="store_true", help="int8 per-channel: run W8A8 with torch._int_mm")
    p.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens to score (0: all of them)")
    p.add_argument("--out", type=Path, help="write the quantized model to this directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _score(model: torch.nn.Module, ids) -> tuple[float, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        loss = full_split_loss(model, ids)
    return loss, time.perf_counter() - t0


def _gptq_weights(model, train_ids, scheme: Scheme, args: argparse.Namespace):
    from impl.ptq.calibration import calibration_batches
    from impl.ptq.gptq import gptq_model

    batches = calibration_batches(train_ids, n_samples=args.calib_samples, seq_len=model.config.block_size)
    return gptq_model(model, batches, scheme, act_order=args.act_order, lm_head=args.lm_head)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        scheme = Scheme(args.bits, args.group_size, not args.asym)
        if args.act_order and args.method != "gptq":
            raise ValueError("--act-order is a GPTQ option: add --method gptq")
        model, tokenizer, meta = zoo.load_any(args.model)
        linear_names(model, lm_head=args.lm_head)  # a model without the layers fails before any work
        for name in linear_names(model, lm_head=args.lm_head):
            scheme.groups(model.get_submodule(name).in_features)
    except ValueError as e:
        print(f"python -m impl.ptq: {e}", file=sys.stderr)
        return 2
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    if args.eval_tokens:
        val_ids = val_ids[: args.eval_tokens + 1]
    model = model.float().eval()
    fp_bytes = model_nbytes(model)
    fp_loss, fp_s = _score(model, val_ids)
    t0 = time.perf_counter()
    weights = _gptq_weights(model, train_ids, scheme, args) if args.method == "gptq" else None
    names = quantize_model(model, scheme, lm_head=args.lm_head, weights=weights)
    if args.int8_matmul:
        use_int8_matmul(model)
    quant_s = time.perf_counter() - t0
    q_bytes = model_nbytes(model)
    q_loss, q_s = _score(model, val_ids)
    report = {
        "model": args.model, "scheme": scheme.label(), "method": args.method, "act_order": args.act_order,
        "lm_head_quantized": args.lm_head, "layers": len(names), "heldout_tokens": len(val_ids) - 1,
        "fp32_bytes": fp_bytes, "quantized_bytes": q_bytes, "size_ratio": round(fp_bytes / q_bytes, 3),
        "fp32_perplexity": round(perplexity(fp_loss), 3), "quantized_perplexity": round(perplexity(q_loss), 3),
        "perplexity_ratio": round(perplexity(q_loss) / perplexity(fp_loss), 4),
        "quantize_s": round(quant_s, 1), "fp32_eval_s": round(fp_s, 1), "quantized_eval_s": round(q_s, 1),
    }
    if args.out:
        path = save_quantized(args.out, model, meta, quantization_meta(
            scheme, names, args.method, act_order=args.act_order, calib_samples=args.calib_samples))
        report |= {"saved": str(args.out), "file_bytes": path.stat().st_size}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {scheme.label()} {args.method}{' act-order' if args.act_order else ''}, "
          f"{len(names)} layers{' incl. the tied head' if args.lm_head else ''}")
    print(f"  size        {fp_bytes / 1e6:8.2f} MB fp32 -> {q_bytes / 1e6:8.2f} MB  ({report['size_ratio']}x smaller)")
    print(f"  perplexity  {report['fp32_perplexity']:8.3f} fp32 -> {report['quantized_perplexity']:8.3f}  "
          f"(x{report['perplexity_ratio']}, {report['heldout_tokens']:,} held-out tokens)")
    print(f"  time        quantize {quant_s:.1f}s, eval {fp_s:.1f}s fp32 / {q_s:.1f}s quantized")
    if args.out:
        print(f"  saved       {args.out} ({report['file_bytes'] / 1e6:.2f} MB file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
