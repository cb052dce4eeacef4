"""Serving figures from finished outputs: throughput and latency percentiles (the CLI and the benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from impl.engine.request import RequestOutput


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(outputs: Sequence[RequestOutput], wall_s: float) -> dict[str, float]:
    """Tokens generated, tokens/s and requests/s over ``wall_s``, and p50/p99 of time to first token, of
    latency (arrival to last token) and of time per output token after the first, in milliseconds."""
    ttft = [o.metrics.ttft_s * 1e3 for o in outputs if o.metrics.ttft_s is not None]
    latency = [o.metrics.latency_s * 1e3 for o in outputs if o.metrics.latency_s is not None]
    tpot = [(o.metrics.latency_s - o.metrics.ttft_s) * 1e3 / (len(o.token_ids) - 1)
            for o in outputs if o.metrics.latency_s is not None and len(o.token_ids) > 1]
    tokens = sum(len(o.token_ids) for o in outputs)
    out = {"requests": len(outputs), "generated_tokens": tokens, "wall_s": wall_s,
           "tokens_per_s": tokens / wall_s if wall_s > 0 else math.nan,
           "requests_per_s": len(outputs) / wall_s if wall_s > 0 else math.nan}
    for name, values in (("ttft_ms", ttft), ("latency_ms", latency), ("tpot_ms", tpot)):
        out[f"{name}_p50"] = percentile(values, 50)
        out[f"{name}_p99"] = percentile(values, 99)
    return out
