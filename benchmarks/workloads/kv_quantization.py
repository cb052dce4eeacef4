"""Project 15 claims on bpe-base: bytes of a KIVI-quantized KV cache against an fp16 cache, and the
context that fits a fixed byte budget; quality and speed of decoding through it in the details.

Settings (fixed before measuring): asymmetric KIVI, keys per channel over groups of G = 32 tokens,
values per token, fp32 scales and uint8 zero points, the < G newest tokens in an fp32 residual
(``impl/kv_quantization``). Every byte figure is the ``nbytes`` of a real cache object after real
appends: codes, scales, zero points and the residual counted.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from harness.measure import Context, Plot, Result, interleaved, require_positive
from impl import zoo
from impl.kv_cache.concat import ConcatKVCache
from impl.kv_cache.fast import KVCache, decode
from impl.kv_quantization import fast, naive

GROUP = 32
SEQ = 256  # bpe-base's block_size: the bytes claim's context


@functools.lru_cache(maxsize=4)
def _splits() -> tuple[torch.nn.Module, np.ndarray]:
    model, tokenizer, meta = zoo.load("bpe-base")
    return model.eval(), zoo.token_splits(tokenizer, meta)[1]


def _heldout(n_seqs: int, length: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """bpe-base and ``n_seqs`` non-overlapping held-out windows (n_seqs, length) of its corpus."""
    model, val = _splits()
    windows = torch.from_numpy(val[: n_seqs * length].astype(np.int64)).view(n_seqs, length)
    return model, windows


def _fp16_cache(model, batch: int, tokens: int) -> KVCache:
    attn = model.blocks[0].attn
    return KVCache(model.config.n_layer, batch, attn.n_head, attn.head_dim, tokens, torch.float16)


@torch.no_grad()
def _teacher_forced_nll(model, windows: torch.Tensor, make_cache, chunk: int) -> float:
    """Mean next-token loss (nats) of ``windows`` (B, T) fed ``chunk`` tokens per forward through
    ``make_cache``'s cache: every prediction attends over what the cache holds after the chunk's append
    (quantized groups and the residual)."""
    B, T = windows.shape
    cache = make_cache(model, B, T)
    total = 0.0
    for start in range(0, T - 1, chunk):
        end = min(start + chunk, T - 1)
        logits = model(windows[:, start:end], cache=cache).float()  # (B, end - start, vocab)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, start + 1:end + 1].flatten(),
                                                   reduction="sum").item()
    return total / (B * (T - 1))


def bytes_reduction(ctx: Context) -> Result:
    """1 - bytes(int8 KIVI cache) / bytes(fp16 cache) after a batch of 8 held-out 256-token sequences went
    through bpe-base with the cache; fp32 / int4 ratios, perplexity and greedy agreement in the details."""
    batch = 8
    model, windows = _heldout(batch, SEQ)
    model = model.to(ctx.device)
    windows = windows.to(ctx.device)
    sizes = {}
    with torch.no_grad():
        for bits in (8, 4):
            cache = fast.QuantizedKVCache.for_model(model, batch, SEQ, bits, GROUP)
            model(windows, cache=cache)  # the real keys/values of the 256 tokens, quantized as they arrive
            sizes[f"int{bits}"] = cache.nbytes
    fp16 = _fp16_cache(model, batch, SEQ).nbytes
    sizes["fp16"], sizes["fp32"] = fp16, 2 * fp16
    value = 1 - sizes["int8"] / fp16
    details = {"context_tokens": SEQ, "batch": batch, "group_size": GROUP, "bytes": sizes,
               "int8_vs_fp32_reduction": round(1 - sizes["int8"] / sizes["fp32"], 4),
               "int4_vs_fp16_reduction": round(1 - sizes["int4"] / fp16, 4)}
    details |= _quality(model, ctx)
    return Result(value=value, details=details, plots=[Plot(
        f"KV cache bytes, bpe-base, {batch} x {SEQ} tokens", list(sizes), {"MiB": [b / 2**20 for b in sizes.values()]},
        ylabel="MiB", kind="bar")])


def _quality(model, ctx: Context) -> dict:
    """Held-out perplexity (one token per forward through each cache) and greedy agreement with fp32."""
    n_seqs, n_prompts, new, chunk = (8, 8, 32, 16) if ctx.quick else (32, 32, 64, 1)
    _, windows = _heldout(n_seqs + n_prompts, SEQ)
    windows = windows.to(ctx.device)
    caches = {"fp32": KVCache.for_model,
              "int8": fast.QuantizedKVCache.factory(8, GROUP), "int4": fast.QuantizedKVCache.factory(4, GROUP)}
    nll = {name: _teacher_forced_nll(model, windows[:n_seqs], make, chunk) for name, make in caches.items()}
    prompts = windows[n_seqs:, :32]
    tokens = {name: decode(model, prompts, new, make_cache=make).new_tokens for name, make in caches.items()}
    out = {"perplexity_sequences": n_seqs, "perplexity_tokens_per_forward": chunk,
           "greedy_prompts": n_prompts, "greedy_new_tokens": new}
    for name in caches:
        out[f"{name}_perplexity"] = round(float(np.exp(nll[name])), 3)
    for name in ("int8", "int4"):
        out[f"{name}_perplexity_delta"] = round(out[f"{name}_perplexity"] - out["fp32_perplexity"], 4)
        same = tokens[name] == tokens["fp32"]
        out[f"{name}_greedy_agreement"] = round(same.float().mean().item(), 4)
        # position of the first differing token per prompt (new if none): after one miss the contexts differ
        first = torch.where(same.all(1), new, (~same).float().argmax(1))
        out[f"{name}_greedy_tokens_before_first_difference_mean"] = round(first.float().mean().item(), 2)
    return out


def _fill(cache, budget: int, n_layer: int, n_head: int, head_dim: int, dtype: torch.dtype, limit: int) -> int:
    """Tokens ``cache`` holds when the next one would take it past ``budget`` bytes (appending one token at a
    time to every layer; seeded random keys/values: byte counts do not depend on the values)."""
    gen = torch.Generator().manual_seed(0)
    for n in range(1, limit + 1):
        k, v = (torch.randn(1, n_head, 1, head_dim, generator=gen).to(dtype) for _ in range(2))
        for layer in range(n_layer):
            if isinstance(cache, ConcatKVCache):
                cache.update(layer, k, v)
            else:
                cache.append(layer, k, v)
        cache.advance(1)
        if cache.nbytes > budget:
            return n - 1
    raise RuntimeError(f"the cache held {limit} tokens within {budget} bytes: raise the limit")


def context_in_budget(ctx: Context) -> Result:
    """Tokens an int8 KIVI cache holds in the bytes an fp16 cache of N tokens takes, / the fp16 cache's
    tokens in the same budget; both filled token by token (batch 1, bpe-base's 6 layers x 4 heads x 64)."""
    model, _ = _heldout(1, 2)
    attn = model.blocks[0].attn
    L, nh, hs = model.config.n_layer, attn.n_head, attn.head_dim
    n_fp16 = 1024 if ctx.quick else 4096
    budget = 2 * L * n_fp16 * nh * hs * 2  # the fp16 formula
    held = {"fp16": _fill(ConcatKVCache(L), budget, L, nh, hs, torch.float16, 2 * n_fp16)}
    for bits in (8, 4):
        held[f"int{bits}"] = _fill(fast.QuantizedKVCache(L, bits, GROUP), budget, L, nh, hs, torch.float32,
                                   8 * n_fp16)
    require_positive("fp16 tokens", held["fp16"])
    value = held["int8"] / held["fp16"]
    details = {"budget_bytes": budget, "tokens_held": held, "group_size": GROUP,
               "int4_ratio": round(held["int4"] / held["fp16"], 4)}
    details |= _decode_speed(model, ctx)
    return Result(value=value, unit="x", details=details, plots=[Plot(
        f"Tokens held in {budget / 2**20:.0f} MiB (bpe-base shape, batch 1)", list(held),
        {"tokens": list(held.values())}, ylabel="tokens", kind="bar")])


def _decode_speed(model, ctx: Context) -> dict:
    """Greedy decode of 8 prompts x 64 new tokens (quick: 32): time with the int8 caches / with the fp32 cache."""
    model = model.to(ctx.device)
    _, windows = _heldout(8, 32)
    prompts = windows.to(ctx.device)
    new = 32 if ctx.quick else 64
    t = interleaved({name: (lambda make=make: decode(model, prompts, new, make_cache=make))
                     for name, make in {"fp32": KVCache.for_model,
                                        "int8_fast": fast.QuantizedKVCache.factory(8, GROUP),
                                        "int8_naive": naive.QuantizedKVCache.factory(8, GROUP)}.items()},
                    rounds=3 if ctx.quick else 7, warmup=1, device=ctx.device)
    fast_ratio, fast_spread = t.ratio("int8_fast", "fp32")
    naive_ratio, _ = t.ratio("int8_naive", "fp32")
    return {"decode_batch": 8, "decode_new_tokens": new,
            "decode_s": {name: round(t.median_s(name), 4) for name in t.seconds},
            "int8_fast_slowdown_vs_fp32": round(fast_ratio, 3),
            "int8_fast_slowdown_iqr": [round(x, 3) for x in fast_spread],
            "int8_naive_slowdown_vs_fp32": round(naive_ratio, 3)}
