"""Claims of project 20: how sparse attention's time and memory grow with sequence length, and
how much longer a context fits a fixed memory budget.

Every method runs causal self-attention on q, k, v of shape (1, 1, N, 64) in fp32:
- window:  block-sparse, sliding window of 2 blocks of 64 tokens + 1 global block (O(N));
- bigbird: block-sparse, window of 1 block + 1 global + 2 random blocks per row (O(N));
- fixed:   block-sparse Sparse Transformer pattern, stride ~ sqrt(N / 64) blocks (O(N sqrt N));
- dense:   impl.gpt.attention.naive_attention, the full (N, N) score matrix (O(N^2)).
The pattern's layout is built once per length in the setup (it is a function of N only); the
measured call is the attention itself.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from harness.measure import Context, Plot, Result, interleaved, peak_memory_bytes, peak_sweep, quartiles
from impl.gpt.attention import naive_attention
from impl.sparse_attention import fast
from impl.sparse_attention.patterns import bigbird_layout, fixed_layout, num_blocks, window_layout

BLOCK_SIZE = 64
HEAD_SIZE = 64
METHODS = ("window", "bigbird", "fixed", "dense")
TARGET = "benchmarks.workloads.sparse_attention:peak_setup"
MIB = 2**20


def layout_for(method: str, seq_len: int) -> torch.Tensor:
    """The causal block layout of one sparse method at ``seq_len`` tokens."""
    n = num_blocks(seq_len, BLOCK_SIZE)
    if method == "window":
        return window_layout(n, window=2, n_global=1, causal=True)
    if method == "bigbird":
        return bigbird_layout(n, window=1, n_global=1, n_random=2, seed=0, causal=True)
    if method == "fixed":
        return fixed_layout(n, stride=max(1, round(math.sqrt(n))), causal=True)
    raise ValueError(f"unknown sparse method {method!r}; known: window, bigbird, fixed")


def attention_call(method: str, seq_len: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """Build inputs (and the layout) for one method and length; return the call to measure."""
    gen = torch.Generator().manual_seed(seq_len)
    q, k, v = (torch.randn(1, 1, seq_len, HEAD_SIZE, generator=gen).to(device) for _ in range(3))
    if method == "dense":
        return lambda: naive_attention(q, k, v, True)
    layout = layout_for(method, seq_len).to(device)
    return lambda: fast.sparse_attention(q, k, v, layout, BLOCK_SIZE, True)


def peak_setup(method: str, seq_len: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """``attention_call`` after one call on a 2-block sequence: the first call's one-off costs
    (thread pool, kernel set-up, ~7 MiB here) would otherwise count as attention memory."""
    attention_call(method, 2 * BLOCK_SIZE, device)()
    return attention_call(method, seq_len, device)


def growth_exponent(lengths: list[int], costs: list[float]) -> float:
    """Least-squares slope of log(cost) against log(length): cost ~ length ** slope."""
    xs, ys = [math.log(n) for n in lengths], [math.log(c) for c in costs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _sweep(ctx: Context) -> list[int]:
    return [1024, 2048, 4096] if ctx.quick else [1024, 2048, 4096, 8192, 16384]


def window_memory_growth(ctx: Context) -> Result:
    """Fitted exponent of the window pattern's peak memory vs N (each peak in a fresh process,
    allocator "trim"); every pattern's exponent, and the window's at glibc's default allocator, in details."""
    lengths = _sweep(ctx)
    peaks = peak_sweep(TARGET, list(METHODS), lengths, device=ctx.device)
    default = [peak_memory_bytes(TARGET, allocator="default", method="window", seq_len=n, device=ctx.device)
               for n in lengths]
    exponents = {m: round(growth_exponent(lengths, peaks[m]), 3) for m in METHODS}
    peak_mib = {m: [round(p / MIB, 2) for p in peaks[m]] for m in METHODS}
    kept = {m: round(layout_for(m, lengths[-1]).float().mean().item(), 4) for m in METHODS if m != "dense"}
    return Result(
        value=exponents["window"],
        details={"seq_lens": lengths, "allocator": "trim (judged)", "exponents": exponents, "peak_MiB": peak_mib,
                 "window_default_allocator": {"peak_MiB": [round(p / MIB, 2) for p in default],
                                              "exponent": round(growth_exponent(lengths, default), 3)},
                 f"kept_block_fraction_at_{lengths[-1]}": kept},
        plots=[Plot("attention peak memory vs sequence length (allocator trim)", x=lengths, series=peak_mib,
                    xlabel="sequence length N", ylabel="peak MiB", logx=True, logy=True)],
    )


def _time_growth(ctx: Context, judged: str, methods: tuple[str, ...]) -> Result:
    """Fitted exponent of ``judged``'s time vs N; ``methods`` interleaved at each N.

    On CPU the sweep runs on one thread: the claim is about how the work grows, and a thread
    pool's fixed cost per op (and its barrier stalls on a shared machine) bends the small-N end
    of the curve without changing the algorithm.
    """
    lengths = _sweep(ctx)
    rounds = 5
    seconds: dict[str, list[list[float]]] = {m: [] for m in methods}  # method -> per N -> per round
    threads = torch.get_num_threads()
    sweep_threads = 1 if ctx.device == "cpu" else threads
    torch.set_num_threads(sweep_threads)
    try:
        for n in lengths:
            fns = {m: attention_call(m, n, ctx.device) for m in methods}
            timings = interleaved(fns, rounds=rounds, warmup=1, device=ctx.device, min_time_s=0.05)
            for m in methods:
                seconds[m].append(timings.seconds[m])
    finally:
        torch.set_num_threads(threads)
    medians_ms = {m: [statistics.median(per_n) * 1e3 for per_n in seconds[m]] for m in methods}
    exponents = {m: round(growth_exponent(lengths, medians_ms[m]), 3) for m in methods}
    per_round = [growth_exponent(lengths, [per_n[r] for per_n in seconds[judged]]) for r in range(rounds)]
    q1, _, q3 = quartiles(per_round)
    kept = {m: round(layout_for(m, lengths[-1]).float().mean().item(), 4) for m in methods if m != "dense"}
    return Result(
        value=exponents[judged],
        spread=(q1, q3),
        details={"seq_lens": lengths, "exponents": exponents, "threads": sweep_threads,
                 "median_ms": {m: [round(t, 3) for t in medians_ms[m]] for m in methods},
                 f"kept_block_fraction_at_{lengths[-1]}": kept,
                 f"time_over_{judged}_at_{lengths[-1]}": {
                     m: round(medians_ms[m][-1] / medians_ms[judged][-1], 2) for m in methods if m != judged}},
        plots=[Plot("attention time vs sequence length", x=lengths, series=medians_ms,
                    xlabel="sequence length N", ylabel="median ms per call", logx=True, logy=True)],
    )


def window_time_growth(ctx: Context) -> Result:
    """Fitted exponent of the sliding window's time vs N, with BigBird and dense attention beside it."""
    return _time_growth(ctx, "window", ("window", "bigbird", "dense"))


def fixed_time_growth(ctx: Context) -> Result:
    """Fitted exponent of the fixed (strided, stride ~ sqrt(N / 64) blocks) pattern's time vs N,
    with the window beside it (dense attention's curve is the window claim's)."""
    return _time_growth(ctx, "fixed", ("fixed", "window"))


def _longest_fitting(
    method: str, budget_bytes: int, device: str, max_len: int
) -> tuple[int, list[list[int]]]:
    """Double N from 256 while the attention peak fits the budget: (longest N that fits, trace)."""
    n, longest, trace = 256, 0, []
    while n <= max_len:
        peak = peak_memory_bytes(TARGET, method=method, seq_len=n, device=device)
        trace.append([n, peak])
        if peak > budget_bytes:
            break
        longest, n = n, 2 * n
    return longest, trace


def longest_context(ctx: Context) -> Result:
    """Longest power-of-two context whose attention peak fits the budget: window / dense."""
    budget_mib = 32 if ctx.quick else 256
    max_len = 2**20  # a cap, so a pattern that never exceeds the budget still ends
    window, window_trace = _longest_fitting("window", budget_mib * MIB, ctx.device, max_len)
    dense, dense_trace = _longest_fitting("dense", budget_mib * MIB, ctx.device, max_len)
    if dense == 0:
        raise RuntimeError(f"dense attention at N=256 already exceeds {budget_mib} MiB: raise the budget")
    plots = [
        Plot(f"{name} attention peak memory vs N ({budget_mib} MiB budget)", x=[n for n, _ in trace],
             series={name: [p / MIB for _, p in trace], "budget": [budget_mib] * len(trace)},
             xlabel="sequence length N", ylabel="peak MiB", logx=True, logy=True)
        for name, trace in (("window", window_trace), ("dense", dense_trace))
    ]
    return Result(
        value=window / dense,
        unit="x",
        details={"budget_MiB": budget_mib, "longest_window": window, "longest_dense": dense,
                 "window_hit_cap": window == max_len,
                 "window_peak_MiB": {n: round(p / MIB, 2) for n, p in window_trace},
                 "dense_peak_MiB": {n: round(p / MIB, 2) for n, p in dense_trace}},
        plots=plots,
    )
