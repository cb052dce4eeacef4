"""Project 27 claims: early-exit greedy generation on ``bpe-base`` (6 layers x 256, vocab 4096) with exit
heads self-distilled from its final layer (``impl.early_exit.train``, cached), against the full model with
the same pre-allocated KV cache (``impl.kv_cache.fast``).

The threshold is never chosen on the prompts the claims are measured on: a sweep on separate calibration
prompts picks the loosest (lowest) threshold whose greedy-token agreement with the full model is >= 0.9;
both claims (the speedup and the agreement) are then measured on the other prompts at that threshold.

Agreement is per step: the fraction of new tokens that equal the full model's greedy token given the
same prefix (the early-exit model's own prefix; one full-model forward over the generated sequence
scores every step). Free-running agreement (both models generating on their own) is in the details: one
early difference changes every later token there, so it measures the first divergence more than quality.
Held-out perplexity with early exit per token (teacher forcing through the same loop) vs threshold is
the quality curve; every timing is interleaved in one process (``harness.measure.interleaved``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.measure import Context, Plot, Result, interleaved
from impl import zoo
from impl.early_exit import fast, naive
from impl.early_exit.heads import ExitHeads
from impl.early_exit.train import load
from impl.gpt.model import GPT
from impl.kv_cache.fast import generate as full_generate

PROMPT_TOKENS = 32
THRESHOLDS = (0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)
NEVER = 2.0  # a threshold above 1: the full model through the early-exit loop
MIN_AGREEMENT = 0.9
CHECK_EVERY = 3  # the exit head asked after layer 3 only (of 6): a head costs about a block (README)
MEASURE = "max_prob"


@dataclass(frozen=True)
class Setup:
    prompts: int  # per set: calibration (choose the threshold) and measured
    new_tokens: int
    rounds: int  # interleaved rounds of the claim
    sweep_rounds: int  # interleaved rounds of the calibration sweep's timing (the plot)
    ppl_windows: int  # held-out windows of PROMPT_TOKENS + ppl_tokens scored with early exit
    ppl_tokens: int


FULL = Setup(prompts=8, new_tokens=128, rounds=5, sweep_rounds=1, ppl_windows=8, ppl_tokens=96)
QUICK = Setup(prompts=2, new_tokens=32, rounds=3, sweep_rounds=1, ppl_windows=2, ppl_tokens=32)


def _setup(ctx: Context) -> tuple[GPT, ExitHeads, dict[str, Any], list[torch.Tensor], list[torch.Tensor],
                                  list[torch.Tensor], Setup]:
    """bpe-base, its exit heads, their metadata, calibration and measured prompts (1, 32) from the first half
    of the held-out split, perplexity windows from its second half."""
    s = QUICK if ctx.quick else FULL
    model, heads, meta = load(quick=ctx.quick)
    model, heads = model.to(ctx.device), heads.to(ctx.device)
    _, tokenizer, zmeta = zoo.load("bpe-base")
    _, val_ids = zoo.token_splits(tokenizer, zmeta)
    half = len(val_ids) // 2
    stride = half // (2 * s.prompts)
    prompts = [torch.from_numpy(val_ids[i * stride:i * stride + PROMPT_TOKENS].astype(np.int64)).view(1, -1)
               .to(ctx.device) for i in range(2 * s.prompts)]
    width = PROMPT_TOKENS + s.ppl_tokens
    wstride = (len(val_ids) - half) // s.ppl_windows
    windows = [torch.from_numpy(val_ids[half + i * wstride:half + i * wstride + width].astype(np.int64)).view(1, -1)
               .to(ctx.device) for i in range(s.ppl_windows)]
    return model, heads, meta, prompts[:s.prompts], prompts[s.prompts:], windows, s


@torch.no_grad()
def _runs(model: GPT, heads: ExitHeads, prompts: list[torch.Tensor], n: int, threshold: float,
          skipped: fast.SkippedKV, full: list[torch.Tensor], check_every: int = CHECK_EVERY) -> dict[str, Any]:
    """Early-exit generations of ``prompts`` at ``threshold``: per-step agreement with the full model on the
    same prefix, free-running agreement with ``full`` (the full model's greedy tokens of each prompt), the
    exit-layer histogram and the mean number of blocks run."""
    agree = free = total = 0
    exits: Counter[int] = Counter()
    for p, reference in zip(prompts, full, strict=True):
        out = fast.generate(model, heads, p, n, threshold, MEASURE, check_every, skipped=skipped)
        T = p.shape[1]
        full_next = model(out.tokens[:, :-1])[0, T - 1:].argmax(dim=-1)  # (n,): the full model's greedy token
        agree += int((full_next == out.new_tokens[0]).sum())
        free += int((reference[0, T:] == out.new_tokens[0]).sum())
        total += n
        exits.update(out.exit_layers.tolist())
    L = model.config.n_layer
    return {"agreement": agree / total, "free_running_agreement": free / total,
            "exit_histogram": {layer: exits.get(layer, 0) for layer in range(1, L + 1)},
            "mean_blocks_run": sum(k * v for k, v in exits.items()) / total}


def choose_threshold(model: GPT, heads: ExitHeads, calibration: list[torch.Tensor], n: int,
                     skipped: fast.SkippedKV, check_every: int = CHECK_EVERY) -> tuple[float, dict[float, dict]]:
    """The loosest threshold of ``THRESHOLDS`` whose per-step agreement on the calibration prompts is >= 0.9
    (``NEVER`` when none is), and every threshold's calibration figures."""
    full = [full_generate(model, p, n) for p in calibration]
    sweep = {t: _runs(model, heads, calibration, n, t, skipped, full, check_every) for t in THRESHOLDS}
    ok = [t for t in THRESHOLDS if sweep[t]["agreement"] >= MIN_AGREEMENT]
    return (min(ok) if ok else NEVER), sweep


@torch.no_grad()
def _perplexity(model: GPT, heads: ExitHeads, windows: list[torch.Tensor], threshold: float,
                skipped: fast.SkippedKV) -> tuple[float, float]:
    """(perplexity, mean blocks run) of the windows' last tokens, each scored by the early-exit model after
    the first PROMPT_TOKENS (teacher forcing through the early-exit loop)."""
    nll, count, blocks = 0.0, 0, 0
    for w in windows:
        forced = w[:, PROMPT_TOKENS:]
        out = fast.generate(model, heads, w[:, :PROMPT_TOKENS], forced.shape[1], threshold, MEASURE, CHECK_EVERY,
                            forced=forced, skipped=skipped)
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # (n, V): the distribution of each forced token
        nll -= float(logp.gather(1, forced[0].view(-1, 1)).sum())
        count += forced.shape[1]
        blocks += int(out.exit_layers.sum())
    return math.exp(nll / count), blocks / count


def _over(prompts: list[torch.Tensor], run) -> Any:
    def all_prompts() -> None:
        for p in prompts:
            run(p)
    return all_prompts


def generation_speedup(ctx: Context) -> Result:
    """time(full model, cached greedy) / time(early-exit greedy at the threshold chosen on calibration prompts)."""
    model, heads, meta, calibration, measured, windows, s = _setup(ctx)
    n = s.new_tokens
    skipped = fast.SkippedKV(model)
    threshold, sweep = choose_threshold(model, heads, calibration, n, skipped)
    # the plot: each threshold's speedup on a quarter of the calibration prompts, against its agreement
    timed = calibration[:max(1, len(calibration) // 4)]
    sides = {f"t={t}": _over(timed, lambda p, t=t: fast.generate(model, heads, p, n, t, MEASURE, CHECK_EVERY,
                                                                 skipped=skipped)) for t in THRESHOLDS}
    timing = interleaved({"full": _over(timed, lambda p: full_generate(model, p, n)), **sides},
                         rounds=s.sweep_rounds, warmup=1, device=ctx.device)
    sweep_speedup = [timing.ratio("full", f"t={t}")[0] for t in THRESHOLDS]
    # the claim, on the measured prompts
    fns = {"full": _over(measured, lambda p: full_generate(model, p, n)),
           "early_exit": _over(measured, lambda p: fast.generate(model, heads, p, n, threshold, MEASURE, CHECK_EVERY,
                                                                 skipped=skipped))}
    t = interleaved(fns, rounds=s.rounds, warmup=1, device=ctx.device)
    value, spread = t.ratio("full", "early_exit")
    # what the loop costs: naive (every layer's head asked) and never exiting, on a quarter of the prompts
    few = measured[:max(1, len(measured) // 4)]
    others = interleaved({
        "full": _over(few, lambda p: full_generate(model, p, n)),
        "naive_early_exit": _over(few, lambda p: naive.generate(model, heads, p, n, threshold, MEASURE)),
        "never_exit": _over(few, lambda p: fast.generate(model, heads, p, n, NEVER, MEASURE, CHECK_EVERY,
                                                         skipped=skipped)),
        "check_every_2": _over(few, lambda p: fast.generate(model, heads, p, n, threshold, MEASURE, 2,
                                                            skipped=skipped))}, rounds=2, warmup=1, device=ctx.device)
    at = _runs(model, heads, measured, n, threshold, skipped, [full_generate(model, p, n) for p in measured])
    ppl = {th: _perplexity(model, heads, windows, th, skipped) for th in (*THRESHOLDS, NEVER)}
    tokens = n * len(measured)
    details = {
        "threshold": threshold, "measure": MEASURE, "check_every": CHECK_EVERY,
        "threshold_chosen_on": f"{len(calibration)} other held-out prompts: the loosest of {list(THRESHOLDS)} with "
                               f"per-step agreement >= {MIN_AGREEMENT}",
        "prompts": f"{len(measured)} x {PROMPT_TOKENS} held-out tokens, {n} new tokens each, greedy, batch 1",
        "agreement_at_threshold": round(at["agreement"], 4),
        "free_running_agreement": round(at["free_running_agreement"], 4),
        "exit_histogram": at["exit_histogram"], "mean_blocks_run": round(at["mean_blocks_run"], 3),
        "tokens_per_s": {name: round(tokens / t.median_s(name), 1) for name in fns},
        "other_sides": {f"speedup of {name}": round(others.ratio("full", name)[0], 3)
                        for name in ("naive_early_exit", "never_exit", "check_every_2")}
                       | {"measured_on": f"{len(few)} of the measured prompts, 2 interleaved rounds; naive asks every "
                                         "layer's head, never_exit runs the loop at a threshold above 1 (its "
                                         "overhead), check_every_2 asks layers 2 and 4 at the same threshold"},
        "sweep_thresholds": list(THRESHOLDS),
        "sweep_agreement": [round(sweep[th]["agreement"], 4) for th in THRESHOLDS],
        "sweep_free_running_agreement": [round(sweep[th]["free_running_agreement"], 4) for th in THRESHOLDS],
        "sweep_mean_blocks_run": [round(sweep[th]["mean_blocks_run"], 3) for th in THRESHOLDS],
        "sweep_speedup": [round(v, 3) for v in sweep_speedup],
        "perplexity": {str(th): round(v[0], 3) for th, v in ppl.items()},
        "perplexity_mean_blocks_run": {str(th): round(v[1], 3) for th, v in ppl.items()},
        "perplexity_tokens": f"{len(windows)} held-out windows, {s.ppl_tokens} tokens each after {PROMPT_TOKENS}",
        "heads": {"cache_entry": "bpe-base-early-exit" + ("-quick" if ctx.quick else ""), "rank": meta["rank"],
                  "recipe": meta["recipe"], "heldout_agreement_per_layer": meta["heldout_agreement"],
                  "heldout_agreement_untrained": meta["heldout_agreement_untrained"]},
    }
    order = sorted(range(len(THRESHOLDS)), key=lambda i: sweep[THRESHOLDS[i]]["agreement"])
    plots = [
        Plot("Early exit: speedup vs greedy-token agreement (calibration prompts, one point per threshold)",
             [round(sweep[THRESHOLDS[i]]["agreement"], 4) for i in order],
             {"speedup over the full model": [sweep_speedup[i] for i in order]},
             xlabel="per-step agreement with the full model", ylabel="x"),
        Plot("Early exit: held-out perplexity and blocks run vs threshold", list(THRESHOLDS),
             {"perplexity (early exit)": [ppl[th][0] for th in THRESHOLDS],
              "perplexity (full model)": [ppl[NEVER][0]] * len(THRESHOLDS),
              "mean blocks run x 10": [10 * ppl[th][1] for th in THRESHOLDS]},
             xlabel="threshold (max probability)", ylabel="perplexity"),
    ]
    return Result(value=value, unit="x", spread=spread, details=details, plots=plots)


def agreement_at_threshold(ctx: Context) -> Result:
    """Per-step greedy-token agreement with the full model on the measured prompts, at the threshold the
    calibration prompts choose (the same choice as ``generation_speedup``'s: deterministic)."""
    model, heads, _, calibration, measured, _, s = _setup(ctx)
    skipped = fast.SkippedKV(model)
    threshold, sweep = choose_threshold(model, heads, calibration, s.new_tokens, skipped)
    at = _runs(model, heads, measured, s.new_tokens, threshold, skipped,
               [full_generate(model, p, s.new_tokens) for p in measured])
    details = {"threshold": threshold, "calibration_agreement": round(sweep[threshold]["agreement"], 4)
               if threshold in sweep else None,
               "free_running_agreement": round(at["free_running_agreement"], 4),
               "exit_histogram": at["exit_histogram"], "mean_blocks_run": round(at["mean_blocks_run"], 3),
               "tokens": s.new_tokens * len(measured)}
    return Result(value=at["agreement"], unit="", details=details)
