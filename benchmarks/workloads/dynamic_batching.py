"""Project 12 claims: continuous batching's throughput over static batching on requests of mixed output
lengths, its throughput-latency trade-off over the max-batched-tokens knob, and the race against HF
transformers' own continuous batching (``generate_batch``'s manager) on the same weights and requests.

The trace is fixed before measuring: prompt lengths uniform, output lengths (``max_tokens``, no stop ids, so
both engines do exactly the same work) exponential with a cap, every request queued at time 0 (offline
throughput). Timing needs no trained weights: a seeded random model of the zoo's shapes.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from harness.measure import Context, Plot, Result, interleaved, quartiles, require_positive
from impl.engine.base import EngineBase
from impl.engine.continuous import Engine
from impl.engine.request import RequestOutput, SamplingParams
from impl.engine.static import StaticEngine
from impl.engine.stats import summarize
from impl.gpt.model import GPT, GPTConfig

MAX_BATCH = 16  # rows per batch for both engines: the same concurrency


def serving_model(quick: bool, device: str = "cpu", block_size: int = 1024) -> GPT:
    """bpe-base's shape (quick: bpe-small's), seeded random weights, eval mode."""
    torch.manual_seed(0)
    shape = dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128) if quick else \
        dict(vocab_size=4096, n_layer=6, n_head=4, n_embd=256)
    return GPT(GPTConfig(block_size=block_size, bias=False, **shape)).to(device).eval()


def mixed_trace(quick: bool, vocab_size: int, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Requests of mixed lengths: prompts uniform in 16..128 (quick 16..64) tokens; outputs exponential with
    mean 96 (quick 48) tokens, clipped to 8..512 (quick 4..256)."""
    rng = random.Random(seed)
    n, longest_prompt, mean, low, high = (32, 64, 48, 4, 256) if quick else (64, 128, 96, 8, 512)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(16, longest_prompt))] for _ in range(n)]
    params = [SamplingParams(max_tokens=max(low, min(high, round(rng.expovariate(1 / mean))))) for _ in range(n)]
    return prompts, params


def serve(engine: EngineBase, prompts, params) -> tuple[list[RequestOutput], float]:
    """Every request through ``engine``; the outputs and the wall time."""
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    return outs, time.perf_counter() - start


def continuous_vs_static(ctx: Context) -> Result:
    """time(static batching) / time(continuous batching) on the same requests = the throughput ratio."""
    model = serving_model(ctx.quick, ctx.device)
    prompts, params = mixed_trace(ctx.quick, model.config.vocab_size)
    last: dict[str, tuple[list[RequestOutput], float, EngineBase]] = {}

    def run(name: str) -> None:
        engine = StaticEngine(model, max_batch=MAX_BATCH) if name == "static" else \
            Engine(model, max_num_seqs=MAX_BATCH, max_batched_tokens=512)
        outs, wall = serve(engine, prompts, params)
        last[name] = (outs, wall, engine)

    t = interleaved({"static": lambda: run("static"), "continuous": lambda: run("continuous")},
                    rounds=2 if ctx.quick else 3, warmup=0, device=ctx.device)
    value, spread = t.ratio("static", "continuous")
    work = {name: [len(o.token_ids) for o in last[name][0]] for name in last}
    if work["static"] != work["continuous"] or work["static"] != [p.max_tokens for p in params]:
        raise AssertionError("the two engines generated different numbers of tokens: not the same work")
    details: dict = {"requests": len(prompts), "generated_tokens": sum(work["static"]), "max_batch": MAX_BATCH,
                     "output_tokens_mean": round(sum(work["static"]) / len(prompts), 1),
                     "output_tokens_max": max(work["static"])}
    for name, (outs, _, engine) in last.items():
        s = summarize(outs, t.median_s(name))
        details[name] = {k: round(v, 1) for k, v in s.items() if k not in ("requests", "generated_tokens")}
        details[name] |= {"steps": engine.counters["steps"], "forwards": engine.counters["forwards"]}
    knobs = [16, 64, 256, 1024] if not ctx.quick else [16, 256]
    sweep = {"tokens_per_s": [], "latency_ms_p50": [], "latency_ms_p99": [], "ttft_ms_p50": []}
    for knob in knobs:
        outs, wall = serve(Engine(model, max_num_seqs=MAX_BATCH, max_batched_tokens=knob), prompts, params)
        s = summarize(outs, wall)
        for key in sweep:
            sweep[key].append(round(s[key], 1))
    details["max_batched_tokens_sweep"] = {"max_batched_tokens": knobs} | sweep
    plots = [
        Plot("Continuous batching: throughput vs the max-batched-tokens knob", knobs,
             {"tokens/s": sweep["tokens_per_s"]}, xlabel="max_batched_tokens", ylabel="tokens/s", logx=True),
        Plot("Continuous batching: latency vs the max-batched-tokens knob", knobs,
             {"p50 latency": sweep["latency_ms_p50"], "p99 latency": sweep["latency_ms_p99"],
              "p50 time to first token": sweep["ttft_ms_p50"]},
             xlabel="max_batched_tokens", ylabel="ms", logx=True),
    ]
    return Result(value=value, unit="x", spread=spread, details=details, plots=plots)


def hf_continuous_race(ctx: Context) -> Result:
    """Our continuous engine's tokens/s over HF transformers' continuous batching on the same weights and
    requests, both greedy, both capped at the same rows per batch and tokens per step.

    HF's manager runs a background thread that keeps polling while it is open (measured here: our engine ran
    3.5x slower beside an idle open manager), so each round opens a manager for HF's side only (its start-up
    and warm-up outside the timed span, as our engine's construction is outside ours) and closes it before our
    side runs. Rounds alternate which side goes first; the figure is the median per-round ratio."""
    from reference.hf_continuous import HFContinuousBatching
    from reference.hf_gpt2 import to_hf

    model = serving_model(ctx.quick, ctx.device)
    hf_model = to_hf(model).to(ctx.device)
    prompts, params = mixed_trace(ctx.quick, model.config.vocab_size)
    lengths = [p.max_tokens for p in params]
    got: dict[str, list[list[int]]] = {}

    def ours() -> float:
        outs, wall = serve(Engine(model, max_num_seqs=MAX_BATCH, max_batched_tokens=512), prompts, params)
        got["ours"] = [o.token_ids for o in outs]
        return wall

    def theirs() -> float:
        with HFContinuousBatching(hf_model, max(lengths), MAX_BATCH, 512) as hf:
            got["hf"], wall = hf.serve(prompts, lengths)
        return wall

    ours()  # warm-up (HF's manager warms itself up on entry)
    seconds: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(2 if ctx.quick else 3):
        for name in (("hf", "ours") if r % 2 == 0 else ("ours", "hf")):
            seconds[name].append(require_positive(f"time of {name}", theirs() if name == "hf" else ours()))
    if [len(o) for o in got["hf"]] != lengths:
        raise AssertionError("HF generated other lengths than asked: not the same work")
    q1, value, q3 = quartiles([h / o for h, o in zip(seconds["hf"], seconds["ours"], strict=True)])
    agree = sum(a == b for a, b in zip(got["ours"], got["hf"], strict=True))
    tokens = sum(lengths)
    return Result(value=value, unit="x", spread=(q1, q3), details={
        "requests": len(prompts), "generated_tokens": tokens,
        "ours_tokens_per_s": round(tokens / statistics.median(seconds["ours"]), 1),
        "hf_tokens_per_s": round(tokens / statistics.median(seconds["hf"]), 1),
        "requests_with_identical_tokens": f"{agree}/{len(prompts)}"})
