"""Claims of project 9: FlashAttention's memory (4-8x less) and speed (2-4x faster).

Every measurement is a causal attention forward without autograd (inference), q, k, v of shape
(B, nh, N, hs), against the textbook ``naive_attention`` (one (N, N) score matrix per head):
- memory: peak above the inputs in a fresh process (CPU: VmHWM; CUDA: max_memory_allocated);
- speed: interleaved rounds in one process; on CUDA the harness synchronizes the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from harness.measure import Context, Plot, Result, Timings, interleaved, peak_memory_bytes, peak_sweep
from impl.flash_attention.fast import flash_forward
from impl.gpt.attention import naive_attention
from reference.torch_sdpa import attention as sdpa_attention

N_HEAD = 4
HEAD_SIZE = 64
MEMORY_N = 4096
MIB = 2**20
PEAK_TARGET = "benchmarks.workloads.flash_attention:peak_setup"


def _tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return flash_forward(q, k, v, causal)[0]


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from impl.flash_attention.triton import flash_attention_triton  # needs CUDA (or the interpreter)

    return flash_attention_triton(q, k, v, causal)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "naive": naive_attention,
    "tiled": _tiled,
    "sdpa": sdpa_attention,
    "triton": _triton,
}


def random_qkv(
    q_shape: tuple[int, ...], kv_len: int, dtype: str = "float32", device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded q of ``q_shape`` (B, nh, T, hs) and k, v of (B, nh, kv_len, hs), dtype given by name."""
    gen = torch.Generator().manual_seed(kv_len)
    B, nh, T, hs = q_shape
    q = torch.randn(B, nh, T, hs, generator=gen)
    k, v = (torch.randn(B, nh, kv_len, hs, generator=gen) for _ in range(2))
    return tuple(t.to(device, getattr(torch, dtype)) for t in (q, k, v))


def attention_call(
    method: str,
    seq_len: int,
    batch: int = 1,
    n_head: int = N_HEAD,
    dtype: str = "float32",
    device: str = "cpu",
) -> Callable[[], torch.Tensor]:
    """Build q, k, v (batch, n_head, seq_len, 64); return a no-grad causal forward of ``method``."""
    q, k, v = random_qkv((batch, n_head, seq_len, HEAD_SIZE), seq_len, dtype, device)
    fn = METHODS[method]

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return fn(q, k, v, True)

    return forward


def peak_setup(method: str, seq_len: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """``attention_call`` after a call at N = 256, so one-off costs (thread pool, kernel
    compilation) are not counted as attention memory."""
    attention_call(method, 256, device=device)()
    return attention_call(method, seq_len, device=device)


def growth_exponent(lengths: list[int], peaks: list[int]) -> float:
    """Exponent e of peak ~ N^e between the two longest lengths (1: linear, 2: quadratic)."""
    return math.log(peaks[-1] / peaks[-2]) / math.log(lengths[-1] / lengths[-2])


def memory_sweep(target: str, methods: list[str], lengths: list[int], judged_n: int, slow: str, fast: str,
                 device: str) -> tuple[float, dict, list[Plot]]:
    """Peak memory of every method at every length (allocator "trim", each in a fresh process),
    the judged figure peak(slow) / peak(fast) at ``judged_n``, and the same ratio with glibc's
    default allocator in the details. Returns (figure, details, plots)."""
    peaks = peak_sweep(target, methods, lengths, device=device)
    default = {m: peak_memory_bytes(target, allocator="default", method=m, seq_len=judged_n, device=device)
               for m in (slow, fast)}
    at = lengths.index(judged_n)
    peak_mib = {m: [round(p / MIB, 2) for p in peaks[m]] for m in methods}
    details = {
        "seq_lens": lengths,
        "allocator": "trim (judged); default in default_allocator_*",
        "peak_MiB": peak_mib,
        "growth_exponent": {m: round(growth_exponent(lengths, peaks[m]), 2) for m in methods},
        f"default_allocator_peak_MiB_at_{judged_n}": {m: round(p / MIB, 2) for m, p in default.items()},
        f"default_allocator_{slow}_over_{fast}_at_{judged_n}": round(default[slow] / default[fast], 2),
    }
    plots = [Plot("attention forward peak memory vs sequence length (allocator trim)", x=lengths, series=peak_mib,
                  xlabel="sequence length N", ylabel="peak MiB above the inputs", logx=True, logy=True)]
    return peaks[slow][at] / peaks[fast][at], details, plots


def memory_4096(ctx: Context) -> Result:
    """naive / tiled peak memory at N = 4096, with the sweep over N for naive, tiled and SDPA."""
    lengths = [1024, 4096] if ctx.quick else [512, 1024, 2048, 4096, 8192]
    methods = ["naive", "tiled", "sdpa"] + (["triton"] if ctx.device.startswith("cuda") else [])
    value, details, plots = memory_sweep(PEAK_TARGET, methods, lengths, MEMORY_N, "naive", "tiled", ctx.device)
    at = lengths.index(MEMORY_N)
    sdpa = details["peak_MiB"]["sdpa"][at]
    details[f"naive_over_sdpa_at_{MEMORY_N}"] = round(details["peak_MiB"]["naive"][at] / sdpa, 1)
    details["shape"] = f"B=1, nh={N_HEAD}, hs={HEAD_SIZE}, float32, causal, no grad"
    return Result(value=value, unit="x", details=details, plots=plots)


def _speed_sweep(
    lengths: list[int], methods: list[str], rounds: int, device: str, **shape: object
) -> tuple[dict[str, list[float]], Timings]:
    """Median seconds per call of each method at each N (interleaved at each N), and the
    timings at the longest N."""
    medians: dict[str, list[float]] = {m: [] for m in methods}
    for n in lengths:
        fns = {m: attention_call(m, n, device=device, **shape) for m in methods}
        timings = interleaved(fns, rounds=rounds, warmup=1, device=device, min_time_s=0.05)
        for m in methods:
            medians[m].append(timings.median_s(m))
    return medians, timings


def _speed_result(medians: dict[str, list[float]], timings: Timings, lengths: list[int], fast: str,
                  shape: str) -> Result:
    """time(naive) / time(fast) at the longest N, with every method's speedup over naive per N."""
    value, spread = timings.ratio("naive", fast)
    speedups = {m: [round(a / b, 3) for a, b in zip(medians["naive"], v, strict=True)]
                for m, v in medians.items() if m != "naive"}
    return Result(
        value=value,
        unit="x",
        spread=spread,
        details={
            "seq_lens": lengths,
            "median_ms": {m: [round(s * 1e3, 3) for s in v] for m, v in medians.items()},
            "speedup_over_naive": speedups,
            f"{fast}_over_sdpa_at_{lengths[-1]}": round(timings.ratio("sdpa", fast)[0], 3),
            "shape": shape,
        },
        plots=[Plot("speedup over naive attention vs sequence length", x=lengths, series=speedups,
                    xlabel="sequence length N", ylabel="time(naive) / time(method)", logx=True)],
    )


def cpu_speed(ctx: Context) -> Result:
    """time(naive) / time(tiled PyTorch) on CPU, fp32, at N = 2048 (quick: 1024)."""
    lengths = [512, 1024] if ctx.quick else [512, 1024, 2048]
    medians, timings = _speed_sweep(lengths, ["naive", "tiled", "sdpa"], 3 if ctx.quick else 5, ctx.device)
    shape = f"B=1, nh={N_HEAD}, hs={HEAD_SIZE}, float32, causal forward"
    return _speed_result(medians, timings, lengths, "tiled", shape)


def cuda_speed(ctx: Context) -> Result:
    """time(naive) / time(Triton kernel) on a CUDA GPU, bf16, B = 4, 16 heads, N = 4096 (quick: 2048)."""
    if not ctx.device.startswith("cuda"):
        raise RuntimeError(f"the Triton speed claim needs a CUDA device, got {ctx.device!r}")
    lengths = [1024, 2048] if ctx.quick else [1024, 2048, 4096]
    medians, timings = _speed_sweep(lengths, ["naive", "triton", "sdpa"], 5 if ctx.quick else 10, ctx.device,
                                    batch=4, n_head=16, dtype="bfloat16")
    shape = f"B=4, nh=16, hs={HEAD_SIZE}, bfloat16, causal forward"
    return _speed_result(medians, timings, lengths, "triton", shape)
