"""Project 8 claims: cached vs uncached generation speed (ours and HF's), the HF race, and the
peak memory of a whole cached generation against the cache formula.

HF transformers is imported inside the workloads that race it, so the peak-memory worker
(a fresh process per figure) does not pay for importing it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.measure import Context, Plot, Result, interleaved, peak_memory_bytes, peak_sweep, quartiles
from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache import concat, fast, naive

PROMPT_TOKENS = 16
MIB = 2**20
PEAK_TARGET = "benchmarks.workloads.kv_cache:generation_setup"
MEMORY_BATCH = 8
CACHES: dict[str, Callable[..., torch.Tensor]] = {"preallocated": fast.generate, "concat": concat.generate}


def p1_config(block_size: int = 1024) -> GPTConfig:
    """Project 1's shape (4 layers, 4 heads, 128 wide, 65 characters) with room for long generations.

    The recipe's 64 positions cannot hold 512 new tokens without cropping, and cropped (sliding)
    generation is a different computation from cached generation, so the position table is longer.
    """
    return GPTConfig(vocab_size=65, block_size=block_size, n_layer=4, n_head=4, n_embd=128)


def p1_shaped_model(block_size: int = 1024, device: str = "cpu") -> GPT:
    """A seeded, randomly initialised GPT of ``p1_config``'s shape on ``device``, in eval mode."""
    torch.manual_seed(0)
    return GPT(p1_config(block_size)).to(device).eval()


def _prompt(device: str, batch: int = 1) -> torch.Tensor:
    return torch.randint(65, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)


def _speedup(model: GPT, new_tokens: int, rounds: int, device: str) -> tuple[float, tuple[float, float], dict]:
    prompt = _prompt(device)
    t = interleaved(
        {"naive": lambda: naive.generate(model, prompt, new_tokens),
         "fast": lambda: fast.generate(model, prompt, new_tokens)},
        rounds=rounds, warmup=1, device=device,
    )
    value, spread = t.ratio("naive", "fast")
    return value, spread, {"naive_s": t.median_s("naive"), "fast_s": t.median_s("fast")}


def speedup_512(ctx: Context) -> Result:
    """time(recompute) / time(pre-allocated cache) for 512 new tokens, batch 1."""
    model = p1_shaped_model(device=ctx.device)
    value, spread, secs = _speedup(model, 512, 3 if ctx.quick else 7, ctx.device)
    return Result(value=value, unit="x", spread=spread, details={
        "new_tokens": 512, "naive_s": round(secs["naive_s"], 3), "fast_s": round(secs["fast_s"], 3),
        "fast_tokens_per_s": round(512 / secs["fast_s"]), "naive_tokens_per_s": round(512 / secs["naive_s"])})


def speedup_growth_vs_hf(ctx: Context) -> Result:
    """How much our cache's speedup grows from the shortest to the longest generation, divided by
    how much HF generate's (use_cache=True vs False) grows over the same lengths in the same run.

    At each length the four generators run interleaved, so every ratio is taken under the same
    load. The figure is taken from the median speedups; the spread is the quartiles of the same
    figure computed round by round.
    """
    from reference.hf_gpt2 import generate as hf_generate
    from reference.hf_gpt2 import to_hf

    model = p1_shaped_model(device=ctx.device)
    hf = to_hf(model).to(ctx.device)
    prompt = _prompt(ctx.device)
    lengths = [32, 256] if ctx.quick else [32, 128, 512, 1000]
    rounds = 3 if ctx.quick else 5
    per_round: dict[str, list[list[float]]] = {"ours": [], "hf": []}  # side -> per length -> per round
    for n in lengths:
        t = interleaved(
            {"ours_uncached": lambda n=n: naive.generate(model, prompt, n),
             "ours_cached": lambda n=n: fast.generate(model, prompt, n),
             "hf_uncached": lambda n=n: hf_generate(hf, prompt, n, use_cache=False),
             "hf_cached": lambda n=n: hf_generate(hf, prompt, n)},
            rounds=rounds, warmup=1, device=ctx.device,
        )
        for side in ("ours", "hf"):
            slow, quick = t.seconds[f"{side}_uncached"], t.seconds[f"{side}_cached"]
            per_round[side].append([a / b for a, b in zip(slow, quick, strict=True)])

    def growth(side: str, r: int) -> float:
        return per_round[side][-1][r] / per_round[side][0][r]

    q1, _, q3 = quartiles([growth("ours", r) / growth("hf", r) for r in range(rounds)])
    medians = {side: [quartiles(v)[1] for v in per_round[side]] for side in per_round}  # per length
    value = (medians["ours"][-1] / medians["ours"][0]) / (medians["hf"][-1] / medians["hf"][0])
    return Result(
        value=value, unit="x", spread=(q1, q3),
        details={"new_tokens": lengths,
                 "ours_speedup": [round(s, 2) for s in medians["ours"]],
                 "hf_speedup": [round(s, 2) for s in medians["hf"]],
                 "ours_growth": round(medians["ours"][-1] / medians["ours"][0], 2),
                 "hf_growth": round(medians["hf"][-1] / medians["hf"][0], 2)},
        plots=[Plot("KV-cache speedup vs generated length (same run)", lengths,
                    {"ours: recompute / cached": medians["ours"], "HF: use_cache=False / True": medians["hf"]},
                    xlabel="new tokens", ylabel="time(uncached) / time(cached)", logx=True)],
    )


def hf_race(ctx: Context) -> Result:
    """Our cached tokens/s divided by HF generate(use_cache=True)'s on the same weights."""
    from reference.hf_gpt2 import generate as hf_generate
    from reference.hf_gpt2 import to_hf

    model = p1_shaped_model(device=ctx.device)
    hf = to_hf(model).to(ctx.device)
    prompt = _prompt(ctx.device)
    n = 128 if ctx.quick else 512
    t = interleaved({"ours": lambda: fast.generate(model, prompt, n),
                     "hf": lambda: hf_generate(hf, prompt, n)},
                    rounds=3 if ctx.quick else 7, warmup=1, device=ctx.device)
    value, spread = t.ratio("hf", "ours")  # time(hf) / time(ours) = tokens/s ours / tokens/s hf
    return Result(value=value, unit="x", spread=spread, details={
        "new_tokens": n, "ours_tokens_per_s": round(n / t.median_s("ours")),
        "hf_tokens_per_s": round(n / t.median_s("hf"))},
        plots=[Plot("Cached generation: tokens/s", ["ours", "HF transformers generate"],
                    {"tokens/s": [n / t.median_s("ours"), n / t.median_s("hf")]},
                    ylabel="tokens/s", kind="bar")])


def generation_setup(method: str, seq_len: int, device: str = "cpu", batch: int = MEMORY_BATCH) -> Callable[[], object]:
    """Build the model and a (batch, 16) prompt, warm up with a short generation (thread pool,
    first-call costs), and return the measured call: greedy generation of ``seq_len`` new tokens
    with the cache ``method`` ("preallocated" or "concat")."""
    model = p1_shaped_model(device=device)
    prompt = _prompt(device, batch)
    generate = CACHES[method]
    generate(model, prompt, 8)
    return lambda: generate(model, prompt, seq_len)


def formula_bytes(config: GPTConfig, batch: int, tokens: int, bytes_per_element: int = 4) -> int:
    """The cache formula: 2 (K and V) * layers * batch * tokens * heads * head_dim * bytes per element."""
    return 2 * config.n_layer * batch * tokens * config.n_embd * bytes_per_element  # heads * head_dim = n_embd


def cache_peak_memory(ctx: Context) -> Result:
    """Peak memory of a whole generation with the pre-allocated cache (above the model and the
    prompt, fresh process, allocator "trim") divided by the cache formula, at the longest length;
    the growing concat cache beside it, and both at glibc's default allocator."""
    lengths = [64, 256] if ctx.quick else [128, 256, 512, 1000]
    config = p1_config()
    formula = [formula_bytes(config, MEMORY_BATCH, PROMPT_TOKENS + n) for n in lengths]
    peaks = peak_sweep(PEAK_TARGET, list(CACHES), lengths, device=ctx.device)
    longest = lengths[-1]
    default = {m: peak_memory_bytes(PEAK_TARGET, allocator="default", method=m, seq_len=longest, device=ctx.device)
               for m in CACHES}
    peak_mib = {f"{m} cache": [round(p / MIB, 2) for p in peaks[m]] for m in CACHES}
    return Result(
        value=peaks["preallocated"][-1] / formula[-1], unit="x",
        details={
            "new_tokens": lengths,
            "formula_MiB": [round(f / MIB, 2) for f in formula],
            "peak_MiB_trim": peak_mib,
            "peak_over_formula_trim": {m: [round(p / f, 3) for p, f in zip(peaks[m], formula, strict=True)]
                                       for m in CACHES},
            f"peak_over_formula_default_allocator_at_{longest}": {m: round(default[m] / formula[-1], 3)
                                                                  for m in CACHES},
            f"concat_over_preallocated_at_{longest}": {
                "trim": round(peaks["concat"][-1] / peaks["preallocated"][-1], 3),
                "default": round(default["concat"] / default["preallocated"], 3)},
            "shape": f"P1 model (4 layers, 4 heads, 128 wide), batch {MEMORY_BATCH}, {PROMPT_TOKENS}-token prompt, "
                     "fp32, greedy",
        },
        plots=[Plot("peak memory of a cached generation vs generated length (allocator trim)", lengths,
                    {**peak_mib, "formula": [f / MIB for f in formula]},
                    xlabel="new tokens", ylabel="peak MiB above model + prompt")],
    )
