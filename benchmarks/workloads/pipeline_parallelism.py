"""Project 24 claims, measured on ``bpe-base`` (6 layers x 4 heads x 256 wide, vocab 4096, tied embedding /
LM head, fp32) split into p = 2 stages on 2 gloo CPU ranks (one torch thread per rank; ``impl.distributed.spawn``).

- The split balances the multiply-accumulates of each unit (embedding, 6 blocks, head: ``partition.flop_costs``):
  blocks 0-3 | 4-5 + head, the split the measured forward + backward seconds also pick when the machine is
  quiet (they are timed too, in the parent before the ranks start, and shown in the details; on this shared
  machine they are too noisy to decide the split: one loaded run picked 0-2 | 3-5 + head).
- Bubble: each rank records its compute events (``runtime.pipeline_step``); for one training step, busy_r = the
  sum of rank r's event durations, span = last end - first start over both ranks (one machine: one monotonic
  clock), bubble = 1 - mean_r(busy_r) / span. Waiting for a transfer counts as idle. The figure is the median
  over the measured steps (after one warm-up step), its spread the quartiles.
- Memory: per rank, the resident-set peak above the step's start (``resident_peak_bytes`` in ranks spawned with
  ``trim=True``, so freed activations leave the resident set), of one step after a warm-up step (gradients
  already allocated); the claim compares the larger of the two ranks' peaks.

On a machine with CUDA but fewer than 2 GPUs the claims are n/a; with 2 GPUs this workload still runs on gloo
CPU ranks (NCCL runs belong to the CLI: ``torchrun --nproc-per-node 2 -m impl.pipeline_parallelism``).
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.measure import Context, MeasurementError, NotApplicable, Plot, Result, quartiles
from impl import zoo
from impl.data.tokens import random_batch
from impl.distributed import resident_peak_bytes, spawn
from impl.gpt.model import GPT
from impl.pipeline_parallelism.partition import build_stage, flop_costs, measured_costs, partition
from impl.pipeline_parallelism.runtime import pipeline_step
from impl.pipeline_parallelism.schedules import Event, bubble_fraction, ideal_bubble
from reference.torch_pipelining import torch_pipeline_runner

MODEL = "bpe-base"
P = 2  # stages = ranks


@dataclass(frozen=True)
class Setup:
    micro_rows: int  # rows of each micro-batch
    length: int  # tokens per row
    steps: int  # measured training steps per (schedule, m), after one warm-up step
    sweep: tuple[int, ...]  # micro-batch counts of the utilization plot (4 always included: the claim's m)


FULL = Setup(micro_rows=4, length=128, steps=5, sweep=(1, 2, 4, 8))
QUICK = Setup(micro_rows=2, length=128, steps=3, sweep=(4,))
M = 4  # the claim's micro-batches
MEMORY_MS = (4, 8)  # m >= 2p


def _require_ranks(ctx: Context) -> None:
    if ctx.device.startswith("cuda") and torch.cuda.device_count() < P:
        raise NotApplicable(f"needs {P} GPUs, this machine has {torch.cuda.device_count()}")


@functools.cache
def _train_ids() -> np.ndarray:
    _, tokenizer, meta = zoo.load(MODEL)
    return zoo.token_splits(tokenizer, meta)[0]


def _batches(micro_rows: int, length: int, ms: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each m, a batch of m * micro_rows windows of train tokens (B, T) and their targets, fixed seed."""
    train_ids, gen = _train_ids(), torch.Generator().manual_seed(0)
    return {m: random_batch(train_ids, m * micro_rows, length, gen) for m in ms}


@functools.cache
def _model_and_split(micro_rows: int, length: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], list, list]:
    """bpe-base's (config, fp32 state), the per-unit measured seconds and the 2-stage split balancing FLOPs."""
    model, _, _ = zoo.load(MODEL)
    model = model.float().eval()
    idx = _batches(micro_rows, length, (1,))[1][0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each rank will have
    try:
        costs = measured_costs(model, idx, repeats=5)
    finally:
        torch.set_num_threads(threads)
    ranges = partition(model, P, flop_costs(model, length))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model.config.to_dict(), state, costs, ranges


def _rank_timelines(rank: int, world: int, config: dict, state: dict, ranges: list, batches: dict,
                    steps: int) -> dict[str, Any]:
    """This rank's compute events per (schedule, m) and measured step; at m = M also the wall time of whole
    steps, ours beside torch.distributed.pipelining's (its schedule built once, so its shape inference is
    not timed)."""
    model = GPT.from_state(config, state).float()
    events, walls = {}, {}
    for m, (idx, targets) in batches.items():
        for schedule in ("gpipe", "1f1b"):
            stage = build_stage(model, ranges, rank)
            runs, ours = [], []
            for _ in range(steps + 1):  # the first is a warm-up
                stage.zero_grad(set_to_none=False)
                torch.distributed.barrier()
                start = time.perf_counter()
                runs.append(pipeline_step(stage, schedule, idx, targets, m)["events"])
                ours.append(time.perf_counter() - start)
            events[(schedule, m)] = runs[1:]
            if m != M:
                continue
            peer_stage = build_stage(model, ranges, rank)
            run = torch_pipeline_runner(peer_stage, schedule, m)
            theirs = []
            for _ in range(steps + 1):
                peer_stage.zero_grad(set_to_none=False)
                torch.distributed.barrier()
                start = time.perf_counter()
                run(idx, targets)
                theirs.append(time.perf_counter() - start)
            walls[schedule] = {"ours": ours[1:], "torch": theirs[1:]}
    return {"events": events, "walls": walls}


@functools.cache
def _timelines(quick: bool) -> tuple[Setup, dict[tuple[str, int], list[list[Event]]], dict, list, list]:
    s = QUICK if quick else FULL
    config, state, costs, ranges = _model_and_split(s.micro_rows, s.length)
    per_rank = spawn(_rank_timelines, P, config, state, ranges, _batches(s.micro_rows, s.length, s.sweep), s.steps,
                     timeout_s=600)
    merged = {key: [sum((r["events"][key][i] for r in per_rank), []) for i in range(s.steps)]
              for key in per_rank[0]["events"]}
    # a step lasts until its slowest rank returns
    walls = {f"{side}_{schedule}": statistics.median(max(r["walls"][schedule][side][i] for r in per_rank)
                                                     for i in range(s.steps))
             for schedule in ("gpipe", "1f1b") for side in ("ours", "torch")}
    return s, merged, walls, costs, ranges


def _bubbles(steps: list[list[Event]]) -> list[float]:
    return [bubble_fraction(events) for events in steps]


def _gantt(events: list[Event], title: str) -> Plot:
    """A timeline drawn as step lines: rank r sits at r while idle, r + 0.8 in a forward, r + 0.4 in a backward.
    Each event edge is an x value taken twice (the level just before it, then just after it), so the lines are
    exact steps with one marker per edge."""
    t0 = min(e.start for e in events)
    edges = sorted({e.start - t0 for e in events} | {e.end - t0 for e in events})

    def level(rank: int, t: float) -> float:
        on = next((e for e in events if e.rank == rank and e.start - t0 < t < e.end - t0), None)
        return rank + (0.0 if on is None else 0.8 if on.kind == "F" else 0.4)

    xs, series = [], {f"rank {r} (F high, B middle, idle low)": [] for r in range(P)}
    for i, t in enumerate(edges):
        before = (edges[i - 1] + t) / 2 if i else t
        after = (edges[i + 1] + t) / 2 if i + 1 < len(edges) else t
        xs += [1000 * t, 1000 * t]
        for r, ys in enumerate(series.values()):
            ys += [level(r, before), level(r, after)]
    return Plot(title, xs, series, xlabel="ms since the step's first event", ylabel="rank + activity")


def _bubble_details(quick: bool) -> tuple[dict[str, Any], list[Plot], Setup]:
    s, merged, walls, costs, ranges = _timelines(quick)
    details: dict[str, Any] = {
        "step_ms_m4_ours_vs_torch_pipelining": {k: round(1000 * v, 1) for k, v in walls.items()},
        "model": MODEL, "stages": P, "micro_batch": f"{s.micro_rows} x {s.length} tokens", "measured_steps": s.steps,
        "split_blocks": [list(r) for r in ranges],
        "unit_costs_ms": [round(1000 * c, 2) for c in costs], "formula_bubble_m4": ideal_bubble(P, M),
    }
    for (schedule, m), steps in sorted(merged.items()):
        bubbles = _bubbles(steps)
        busy = [statistics.median(sum(e.end - e.start for e in ev if e.rank == r) for ev in steps) for r in range(P)]
        details[f"{schedule}_m{m}"] = {
            "bubble_median": statistics.median(bubbles), "bubbles": [round(b, 4) for b in bubbles],
            "busy_ms_per_rank": [round(1000 * b, 1) for b in busy],
            "span_ms": round(1000 * statistics.median(max(e.end for e in ev) - min(e.start for e in ev)
                                                      for ev in steps), 1),
        }
    plots = [_gantt(merged[(sch, M)][len(merged[(sch, M)]) // 2], f"{name} timeline, p = 2, m = 4 (bpe-base, "
                    f"{s.micro_rows} x {s.length} tokens a micro-batch)")
             for sch, name in (("gpipe", "GPipe"), ("1f1b", "1F1B"))]
    if len(s.sweep) > 1:
        plots.append(Plot("Utilization (1 - bubble) vs micro-batches, p = 2", list(s.sweep), {
            "GPipe (measured)": [1 - statistics.median(_bubbles(merged[("gpipe", m)])) for m in s.sweep],
            "1F1B (measured)": [1 - statistics.median(_bubbles(merged[("1f1b", m)])) for m in s.sweep],
            "m / (m + p - 1) (formula)": [1 - ideal_bubble(P, m) for m in s.sweep],
        }, xlabel="micro-batches m", ylabel="utilization", logx=True))
    return details, plots, s


def gpipe_bubble(ctx: Context) -> Result:
    """Measured bubble fraction of our GPipe at p = 2, m = 4 (median over steps); 1F1B's in the details."""
    _require_ranks(ctx)
    details, plots, _ = _bubble_details(ctx.quick)
    bubbles = details[f"gpipe_m{M}"]["bubbles"]
    q1, med, q3 = quartiles(bubbles)
    return Result(med, "", (q1, q3), details, plots)


def bubble_vs_formula(ctx: Context) -> Result:
    """|measured bubble - (p - 1) / (m + p - 1)| of our GPipe at p = 2, m = 4 (1F1B's in the details)."""
    _require_ranks(ctx)
    details, _, _ = _bubble_details(ctx.quick)
    ideal = ideal_bubble(P, M)
    diffs = [abs(b - ideal) for b in details[f"gpipe_m{M}"]["bubbles"]]
    q1, med, q3 = quartiles(diffs)
    details["one_f_one_b_abs_diff"] = abs(details[f"1f1b_m{M}"]["bubble_median"] - ideal)
    return Result(med, "", (q1, q3), details)


def _rank_peaks(rank: int, world: int, config: dict, state: dict, ranges: list, batches: dict) -> dict:
    model = GPT.from_state(config, state).float()
    out = {}
    for m, (idx, targets) in batches.items():
        for schedule in ("gpipe", "1f1b"):
            stage = build_stage(model, ranges, rank)
            pipeline_step(stage, schedule, idx, targets, m)  # warm-up: gradients allocated, kernels touched
            stage.zero_grad(set_to_none=False)
            torch.distributed.barrier()
            _, peak = resident_peak_bytes(functools.partial(pipeline_step, stage, schedule, idx, targets, m))
            out[(schedule, m)] = peak
    return out


def peak_activation_ratio(ctx: Context) -> Result:
    """1F1B's peak memory of a training step / GPipe's (each the larger of the two ranks' resident peaks),
    the larger of the ratios at m = 4 and m = 8 (both m >= 2p)."""
    _require_ranks(ctx)
    s = QUICK if ctx.quick else FULL
    config, state, _, ranges = _model_and_split(s.micro_rows, s.length)
    per_rank = spawn(_rank_peaks, P, config, state, ranges, _batches(s.micro_rows, s.length, MEMORY_MS),
                     trim=True, timeout_s=600)
    details: dict[str, Any] = {"micro_batch": f"{s.micro_rows} x {s.length} tokens", "split_blocks": ranges}
    ratios = []
    for m in MEMORY_MS:
        peaks = {sch: [r[(sch, m)] for r in per_rank] for sch in ("gpipe", "1f1b")}
        if min(min(v) for v in peaks.values()) <= 0:
            raise MeasurementError(f"a rank's peak is not positive at m = {m}: {peaks}")
        ratio = max(peaks["1f1b"]) / max(peaks["gpipe"])
        ratios.append(ratio)
        details[f"m{m}"] = {"gpipe_peak_MiB_per_rank": [round(v / 2**20, 1) for v in peaks["gpipe"]],
                            "1f1b_peak_MiB_per_rank": [round(v / 2**20, 1) for v in peaks["1f1b"]],
                            "ratio_of_max_over_ranks": round(ratio, 4),
                            "ratio_rank0": round(peaks["1f1b"][0] / peaks["gpipe"][0], 4)}
    plot = Plot("Peak memory of a step, larger rank (MiB), p = 2", [f"m = {m}" for m in MEMORY_MS], {
        "GPipe": [max(details[f"m{m}"]["gpipe_peak_MiB_per_rank"]) for m in MEMORY_MS],
        "1F1B": [max(details[f"m{m}"]["1f1b_peak_MiB_per_rank"]) for m in MEMORY_MS],
    }, ylabel="MiB", kind="bar")
    return Result(max(ratios), "x", None, details, [plot])
