"""Claims of project 22: chunked attention's memory (2-4x less) and split-K decoding latency.

- memory: one causal forward without autograd, q, k, v (1, 4, N, 64) fp32, peak above the
  inputs in a fresh process, naive (full (N, N) scores per head) vs chunked attention;
- decoding: one query token per head (T = 1) over a KV cache of S positions, split-K (pieces
  of 512 keys) against the same code with one piece, interleaved rounds in one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.workloads.flash_attention import memory_sweep, random_qkv
from harness.measure import Context, Plot, Result, Timings, interleaved
from impl.gpt.attention import naive_attention
from impl.memory_efficient_attention import DECODE_KEYS_PER_SPLIT, PREFILL_KEYS_PER_CHUNK
from impl.memory_efficient_attention.fast import chunked_attention, split_k_attention
from reference.torch_sdpa import attention as sdpa_attention

MEMORY_N = 4096
PEAK_TARGET = "benchmarks.workloads.memory_efficient_attention:peak_setup"


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    num_splits = math.ceil(k.shape[2] / PREFILL_KEYS_PER_CHUNK)
    return chunked_attention(q, k, v, causal, num_splits=num_splits, query_chunk=256)


PREFILL: dict[str, Callable[..., torch.Tensor]] = {"naive": naive_attention, "chunked": _chunked}


def peak_setup(method: str, seq_len: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """Inputs (1, 4, seq_len, 64) and a no-grad causal forward of ``method``, after a warm-up call
    at N = 256 so that one-off costs (thread pool, allocator) are not counted."""
    fn = PREFILL[method]

    def call_at(n: int) -> Callable[[], torch.Tensor]:
        q, k, v = random_qkv((1, 4, n, 64), n, device=device)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return fn(q, k, v, True)

        return forward

    call_at(256)()
    return call_at(seq_len)


def memory_long(ctx: Context) -> Result:
    """naive / chunked peak memory at N = 4096, with the sweep over N."""
    lengths = [1024, 4096] if ctx.quick else [1024, 2048, 4096, 8192]
    value, details, plots = memory_sweep(PEAK_TARGET, list(PREFILL), lengths, MEMORY_N, "naive", "chunked",
                                         ctx.device)
    details["shape"] = "B=1, nh=4, hs=64, float32, causal, no grad; query chunks 256, key pieces 1024"
    return Result(value=value, unit="x", details=details, plots=plots)


def _decode_sweep(
    lengths: list[int], methods: dict[str, Callable[..., torch.Tensor]], rounds: int, device: str,
    n_head: int, head_size: int, dtype: str,
) -> tuple[dict[str, list[float]], Timings]:
    """Median ms of each decode method per KV length (interleaved), and the timings at the last."""
    medians_ms: dict[str, list[float]] = {m: [] for m in methods}
    for n in lengths:
        q, k, v = random_qkv((1, n_head, 1, head_size), n, dtype, device)
        splits = math.ceil(n / DECODE_KEYS_PER_SPLIT)
        fns = {m: partial(fn, q, k, v, True, splits) for m, fn in methods.items()}
        with torch.no_grad():
            timings = interleaved(fns, rounds=rounds, warmup=2, device=device, min_time_s=0.05)
        for m in methods:
            medians_ms[m].append(round(timings.median_s(m) * 1e3, 4))
    return medians_ms, timings


def _decode_result(
    medians_ms: dict[str, list[float]], timings: Timings, lengths: list[int], shape: str
) -> Result:
    value, spread = timings.ratio("unsplit", "split_k")
    return Result(
        value=value,
        unit="x",
        spread=spread,
        details={
            "kv_lens": lengths,
            "median_ms": medians_ms,
            "speedup_split_k_over_unsplit": [round(a / b, 3) for a, b in
                                             zip(medians_ms["unsplit"], medians_ms["split_k"], strict=True)],
            "keys_per_split": DECODE_KEYS_PER_SPLIT,
            "shape": shape,
        },
        plots=[Plot("decode attention latency vs KV-cache length", x=lengths, series=medians_ms,
                    xlabel="KV-cache length S", ylabel="median ms per decode step", logx=True, logy=True)],
    )


def decode_cpu(ctx: Context) -> Result:
    """time(unsplit) / time(split-K), batched PyTorch, one query over 64K cached keys, on CPU."""
    lengths = [4096, 16384, 65536] if ctx.quick else [4096, 8192, 16384, 32768, 65536]
    methods = {
        "unsplit": lambda q, k, v, causal, splits: split_k_attention(q, k, v, causal, 1),
        "split_k": split_k_attention,
        "naive": lambda q, k, v, causal, splits: naive_attention(q, k, v, causal),
        "sdpa": lambda q, k, v, causal, splits: sdpa_attention(q, k, v, causal),
    }
    rounds = 3 if ctx.quick else 7
    medians_ms, timings = _decode_sweep(lengths, methods, rounds, ctx.device, 12, 64, "float32")
    return _decode_result(medians_ms, timings, lengths, "B=1, nh=12, hs=64, float32, T=1")


def decode_cuda(ctx: Context) -> Result:
    """time(Triton, 1 split) / time(Triton split-K), one query over 64K cached keys, on a CUDA GPU."""
    if not ctx.device.startswith("cuda"):
        raise RuntimeError(f"the Flash-Decoding claim needs a CUDA device, got {ctx.device!r}")
    from impl.memory_efficient_attention.triton import split_k_attention as triton_split_k

    lengths = [4096, 16384, 65536] if ctx.quick else [4096, 8192, 16384, 32768, 65536]
    methods = {
        "unsplit": lambda q, k, v, causal, splits: triton_split_k(q, k, v, causal, 1),
        "split_k": triton_split_k,
        "naive": lambda q, k, v, causal, splits: naive_attention(q, k, v, causal),
        "sdpa": lambda q, k, v, causal, splits: sdpa_attention(q, k, v, causal),
    }
    medians_ms, timings = _decode_sweep(lengths, methods, 10, ctx.device, 32, 128, "bfloat16")
    return _decode_result(medians_ms, timings, lengths, "B=1, nh=32, hs=128, bfloat16, T=1")
