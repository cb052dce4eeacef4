"""Project 8 claims: cached vs uncached generation speed, the HF race, and exact cache bytes."""

from __future__ import annotations

import torch

from harness.measure import Context, Plot, Result, interleaved
from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache import fast, naive
from reference.hf_gpt2 import generate as hf_generate
from reference.hf_gpt2 import to_hf

PROMPT_TOKENS = 16


def p1_shaped_model(block_size: int = 1024, device: str = "cpu") -> GPT:
    """Project 1's shape (4 layers, 4 heads, 128 wide, 65 characters) with room for long generations.

    The recipe's 64 positions cannot hold 512 new tokens without cropping, and cropped (sliding)
    generation is a different computation from cached generation, so the position table is longer.
    """
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=65, block_size=block_size, n_layer=4, n_head=4, n_embd=128)).to(device).eval()


def _prompt(device: str) -> torch.Tensor:
    return torch.randint(65, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0)).to(device)


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
    model = p1_shaped_model(device=ctx.device)
    value, spread, secs = _speedup(model, 512, 3 if ctx.quick else 7, ctx.device)
    return Result(value=value, unit="x", spread=spread, details={
        "new_tokens": 512, "naive_s": round(secs["naive_s"], 3), "fast_s": round(secs["fast_s"], 3),
        "fast_tokens_per_s": round(512 / secs["fast_s"]), "naive_tokens_per_s": round(512 / secs["naive_s"])})


def speedup_curve(ctx: Context) -> Result:
    model = p1_shaped_model(device=ctx.device)
    lengths = [32, 128, 512] if ctx.quick else [32, 64, 128, 256, 512, 1000]
    speedups, lows, highs = [], [], []
    for n in lengths:
        value, (lo, hi), _ = _speedup(model, n, 3 if ctx.quick else 5, ctx.device)
        speedups.append(value)
        lows.append(lo)
        highs.append(hi)
    return Result(
        value=speedups[-1] / speedups[0], unit="x",
        details={f"speedup_at_{n}": round(s, 2) for n, s in zip(lengths, speedups, strict=True)},
        plots=[Plot("KV-cache speedup vs generated length", lengths,
                    {"speedup (median)": speedups, "q1": lows, "q3": highs},
                    xlabel="new tokens", ylabel="time(naive) / time(cached)", logx=True)],
    )


def hf_race(ctx: Context) -> Result:
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


def cache_bytes(ctx: Context) -> Result:
    """Measured bytes / formula bytes, the worst over several shapes and dtypes (must be exactly 1)."""
    ratios = {}
    for layers, batch, tokens, heads, head_dim, dtype in [
        (4, 1, 528, 4, 32, torch.float32), (12, 8, 1024, 12, 64, torch.bfloat16), (2, 3, 17, 1, 8, torch.float16),
    ]:
        cache = fast.KVCache(layers, batch, heads, head_dim, tokens, dtype=dtype)
        formula = 2 * layers * batch * tokens * heads * head_dim * torch.finfo(dtype).bits // 8
        ratios[f"{layers}L x B{batch} x {tokens} tok x {heads}h x {head_dim} ({dtype})"] = cache.nbytes / formula
    worst = max(ratios.values(), key=lambda r: abs(r - 1))
    return Result(value=worst, unit="x", details=ratios)
