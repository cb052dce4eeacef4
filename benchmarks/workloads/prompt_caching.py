"""Project 10 claims: time to first token with a cached shared prefix, a repeated exact query answered by the
response cache, and the prefix cache's hit rate on a few system prompts x many user questions.

Timing needs no trained weights: a seeded random model of bpe-base's shape (quick: bpe-small's) with a position
table long enough for a 1K-token prefix.
"""

from __future__ import annotations

import random

from benchmarks.workloads.dynamic_batching import serving_model
from harness.measure import Context, Plot, Result, interleaved
from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.prompt_caching.response_cache import ResponseCache

PREFIX_TOKENS = 1024
SUFFIX_TOKENS = 16


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _first_token(engine: Engine, prompt: list[int]):
    """Serve ``prompt`` for one token; its output (metrics: time to first token, cached prompt tokens)."""
    return engine.generate([prompt], SamplingParams(max_tokens=1))[0]


def prefix_ttft(ctx: Context) -> Result:
    """Time to first token of a request whose 1,024-token prefix another request already left in the prefix
    cache, against the same request on the same engine without prefix caching (every call a fresh 16-token
    question, so only the shared prefix can be reused)."""
    model = serving_model(ctx.quick, ctx.device, block_size=2048)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    lengths = [128, 512, PREFIX_TOKENS] if ctx.quick else [128, 256, 512, PREFIX_TOKENS]
    curve: dict[str, list[float]] = {"without prefix caching": [], "with prefix caching": []}
    result = None
    for n in lengths:
        prefix = _ids(rng, n, vocab)
        engines = {name: Engine(model, max_num_seqs=4, max_batched_tokens=2048, prefix_caching=on)
                   for name, on in (("cold", False), ("cached", True))}
        _first_token(engines["cached"], prefix + _ids(rng, SUFFIX_TOKENS, vocab))  # leaves the prefix cached
        seen = {}

        def run(name: str, prefix=prefix, engines=engines, seen=seen) -> None:
            seen[name] = _first_token(engines[name], prefix + _ids(rng, SUFFIX_TOKENS, vocab))

        t = interleaved({"cold": lambda: run("cold"), "cached": lambda: run("cached")},
                        rounds=3 if ctx.quick else 5, warmup=1, device=ctx.device)
        cached_tokens = seen["cached"].metrics.cached_prompt_tokens
        if cached_tokens != n // 16 * 16 or seen["cold"].metrics.cached_prompt_tokens != 0:
            raise AssertionError(f"the cached side reused {cached_tokens} tokens of a {n}-token prefix, "
                                 f"the cold side {seen['cold'].metrics.cached_prompt_tokens}")
        curve["without prefix caching"].append(round(t.median_s("cold") * 1e3, 2))
        curve["with prefix caching"].append(round(t.median_s("cached") * 1e3, 2))
        if n == PREFIX_TOKENS:
            value, spread = t.ratio("cold", "cached")
            result = (value, spread, cached_tokens, engines["cached"].prefix_stats())
    value, spread, cached_tokens, stats = result
    return Result(value=value, unit="x", spread=spread, details={
        "prefix_tokens": PREFIX_TOKENS, "question_tokens": SUFFIX_TOKENS, "cached_prompt_tokens": cached_tokens,
        "ttft_ms_without": curve["without prefix caching"][-1], "ttft_ms_with": curve["with prefix caching"][-1],
        "prefix_lengths": lengths, "ttft_ms_curve": curve, "prefix_cache": stats},
        plots=[Plot("Time to first token vs shared prefix length", lengths, curve, xlabel="shared prefix tokens",
                    ylabel="ms", logx=True, logy=True)])


def repeated_query(ctx: Context) -> Result:
    """Time to answer a repeated exact query (64-token prompt, 64 greedy tokens) from the response cache,
    against answering a new query of the same shape with the model."""
    model = serving_model(ctx.quick, ctx.device)
    vocab = model.config.vocab_size
    rng = random.Random(1)
    params = SamplingParams(max_tokens=64)
    engine = Engine(model, max_num_seqs=4, response_cache=ResponseCache(capacity=64))
    repeated = _ids(rng, 64, vocab)
    first = engine.generate([repeated], params)[0]

    def new_query() -> None:
        engine.generate([_ids(rng, 64, vocab)], params)

    def same_query() -> None:
        out = engine.generate([repeated], params)[0]
        if out.token_ids != first.token_ids or not out.metrics.response_cache_hit:
            raise AssertionError("the repeated query was not answered from the cache with the stored tokens")

    t = interleaved({"model": new_query, "cache": same_query}, rounds=3 if ctx.quick else 5, warmup=1,
                    device=ctx.device, min_time_s=0.05)
    value, spread = t.ratio("model", "cache")
    return Result(value=value, unit="x", spread=spread, details={
        "prompt_tokens": 64, "generated_tokens": 64, "model_ms": round(t.median_s("model") * 1e3, 2),
        "cache_ms": round(t.median_s("cache") * 1e3, 4), "response_cache": engine.response_cache.stats()})


def system_prompt_hit_rate(ctx: Context) -> Result:
    """Fraction of prompt tokens served from the prefix cache when a few system prompts each precede many user
    questions, arriving in random order, served 16 at a time."""
    model = serving_model(ctx.quick, ctx.device)
    vocab = model.config.vocab_size
    rng = random.Random(2)
    n_system, n_questions, system_tokens = (4, 12, 128) if ctx.quick else (4, 32, 256)
    systems = [_ids(rng, system_tokens, vocab) for _ in range(n_system)]
    prompts = [systems[s] + _ids(rng, rng.randint(8, 24), vocab) for s in range(n_system) for _ in range(n_questions)]
    rng.shuffle(prompts)
    engine = Engine(model, max_num_seqs=16, max_batched_tokens=512, prefix_caching=True)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8))
    cached = sum(o.metrics.cached_prompt_tokens for o in outs)
    total = sum(len(p) for p in prompts)
    ideal = sum(system_tokens // 16 * 16 for _ in prompts) - n_system * (system_tokens // 16 * 16)
    return Result(value=cached / total, unit="", details={
        "system_prompts": n_system, "questions_each": n_questions, "system_prompt_tokens": system_tokens,
        "prompt_tokens": total, "prompt_tokens_from_cache": cached,
        "best_possible": round(ideal / total, 4), "prefix_cache_blocks": engine.prefix_stats()})

