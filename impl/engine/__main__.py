"""Run the inference engine on a JSONL file of prompts; print throughput and latency percentiles.

    python -m impl.engine prompts.jsonl --model bpe-base --max-tokens 64
    python -m impl.engine prompts.jsonl --model chat --engine static --out answers.jsonl

Each line holds ``{"prompt": "text"}`` or ``{"prompt_ids": [ids]}``, optionally with its own ``max_tokens``,
``temperature``, ``top_k``, ``top_p`` and ``seed`` (the command-line values are the defaults). Generation stops
at the tokenizer's end-of-turn / end-of-text ids (``--no-stop`` generates to max_tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from impl.engine.base import EngineBase
from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.engine.static import StaticEngine
from impl.engine.stats import summarize
from impl.prompt_caching.response_cache import ResponseCache

FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed")


def read_requests(path: Path, tokenizer, defaults: dict,
                  stop_ids: tuple[int, ...]) -> list[tuple[list[int], SamplingParams]]:
    """(prompt ids, settings) of every line of ``path``; a bad line is an error naming the line."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or ("prompt" in record) == ("prompt_ids" in record):
                raise ValueError(f'{where}: each line needs exactly one of "prompt" (text) or "prompt_ids" (ids)')
            ids = record["prompt_ids"] if "prompt_ids" in record else tokenizer.encode(record["prompt"])
            settings = defaults | {k: record[k] for k in FIELDS if k in record}
            try:
                requests.append((list(ids), SamplingParams(stop_ids=stop_ids, **settings)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return requests


def build_engine(args: argparse.Namespace, model, draft=None) -> EngineBase:
    cache = ResponseCache(args.response_cache) if args.response_cache else None
    if args.engine == "static":
        return StaticEngine(model, max_batch=args.max_num_seqs, response_cache=cache)
    knobs = dict(max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens, kv_bits=args.kv_bits,
                 block_size=args.block_size, num_blocks=args.num_blocks, prefix_caching=args.prefix_caching,
                 response_cache=cache)
    if draft is not None:
        from impl.engine.speculative import SpeculativeEngine

        return SpeculativeEngine(model, draft, num_speculative=args.num_speculative, **knobs)
    return Engine(model, **knobs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m impl.engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", type=Path, help="JSONL of requests (see the module help)")
    p.add_argument("--model", default="bpe-base", help="zoo model name or saved model directory")
    p.add_argument("--engine", choices=["continuous", "static"], default="continuous",
                   help="continuous batching on the paged cache, or static batching (the baseline)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests in flight (static: rows per batch)")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per step (prefill chunks + decodes)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--kv-bits", type=int, choices=[8, 4], default=None,
                   help="store the KV cache as KIVI int8 / int4 (P15; default: the model's dtype)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: every row at full context)")
    p.add_argument("--prefix-caching", action="store_true", help="reuse cached blocks of shared prompt prefixes")
    p.add_argument("--response-cache", type=int, default=0, metavar="N",
                   help="answer repeated deterministic requests from an LRU cache of N entries (0: off)")
    p.add_argument("--draft", default=None, help="draft model (zoo name or directory, the target's tokenizer) for "
                   "speculative decoding, e.g. bpe-draft for bpe-base")
    p.add_argument("--num-speculative", type=int, default=4, help="tokens drafted per step with --draft")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed of every request without its own")
    p.add_argument("--no-stop", action="store_true", help="ignore end-of-turn / end-of-text ids")
    p.add_argument("--out", type=Path, help="write every answer (text, ids, timings) to this JSONL")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from impl.sft.evaluate import stop_ids
    from impl.zoo import load_any

    try:
        model, tokenizer, _ = load_any(args.model)
        stops = () if args.no_stop else tuple(stop_ids(tokenizer)) if hasattr(tokenizer, "special_tokens") else ()
        defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                    "top_p": args.top_p, "seed": args.seed}
        requests = read_requests(args.prompts, tokenizer, defaults, stops)
        if args.draft and args.engine == "static":
            raise ValueError("--draft needs the continuous engine")
        if args.engine == "static" and args.kv_bits:
            raise ValueError("--kv-bits needs the continuous engine (the static engine uses the contiguous cache)")
        draft = load_any(args.draft)[0] if args.draft else None
        engine = build_engine(args, model, draft)
        ids = [engine.add_request(p, s) for p, s in requests]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    final = {}
    with tqdm(total=len(ids), unit="req", disable=args.no_progress, desc=f"{args.engine} engine") as bar:
        for out in engine.stream():
            if out.finished:
                final[out.request_id] = out
                bar.update(1)
    wall = time.perf_counter() - start
    outs = [final[i] for i in ids]
    s = summarize(outs, wall)
    print(f"{s['requests']} requests, {s['generated_tokens']} tokens in {wall:.2f} s: "
          f"{s['tokens_per_s']:.1f} tokens/s, {s['requests_per_s']:.2f} requests/s")
    for name in ("ttft", "latency", "tpot"):
        print(f"{name:>8} ms  p50 {s[f'{name}_ms_p50']:9.1f}   p99 {s[f'{name}_ms_p99']:9.1f}")
    counters = dict(engine.counters)
    if isinstance(engine, Engine) and engine.prefix_caching:
        counters["prefix_hit_rate"] = round(engine.prefix_stats()["hit_rate"], 3)
    if counters.get("drafted"):
        counters["acceptance_rate"] = round(counters["accepted"] / counters["drafted"], 3)
    if engine.response_cache is not None:
        counters["response_cache_hits"] = engine.response_cache.hits
    print("engine:", ", ".join(f"{k} {v}" for k, v in counters.items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for o in outs:
                f.write(json.dumps({"id": o.request_id, "prompt_ids": o.prompt_ids, "token_ids": o.token_ids,
                                    "text": tokenizer.decode(o.token_ids), "finish_reason": o.finish_reason,
                                    "ttft_ms": round(o.metrics.ttft_s * 1e3, 2),
                                    "latency_ms": round(o.metrics.latency_s * 1e3, 2)}) + "\n")
        print(f"answers written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
