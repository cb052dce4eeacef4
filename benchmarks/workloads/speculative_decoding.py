"""Workload of project 11: speculative decoding's tokens/s against target-only cached generation.

Target ``bpe-base`` (6 x 256), draft ``bpe-draft`` (2 x 128, the same tokenizer), both from the
model cache; greedy; 32-token prompts cut from the held-out 10% of the corpus, 128 new tokens each.
k is chosen before the claim is measured, on a separate set of tuning prompts (a sweep of k = 1..8,
which also gives the speedup-vs-k plot); the claim then races target-only ``impl.kv_cache.fast``
decoding against speculative decoding at that k on the other prompts, interleaved, with adaptive k,
the Medusa heads and HF transformers' assisted generation (same weights) in the same rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from harness.measure import Context, MeasurementError, Plot, Result, interleaved
from impl.gpt.model import GPT
from impl.kv_cache.fast import KVCache, generate
from impl.speculative_decoding.fast import Stats, speculative_generate

PROMPT_TOKENS = 32
NEW_TOKENS = 128
N_PROMPTS = 4  # per set: tuning (choose k) and measuring
K_SWEEP = list(range(1, 9))


def _models(device: str) -> tuple[GPT, GPT, list[torch.Tensor]]:
    """bpe-base, bpe-draft (their tokenizers checked equal) and 2 * N_PROMPTS held-out prompts (1, 32)."""
    from impl import zoo
    from impl.data.corpus import load_text, split_text

    target, tokenizer, meta = zoo.load("bpe-base")
    draft, _, draft_meta = zoo.load("bpe-draft")
    if draft_meta["tokenizer"]["merges"] != meta["tokenizer"]["merges"]:
        raise MeasurementError("bpe-draft's tokenizer is not bpe-base's: the two models would not share ids")
    recipe = zoo.RECIPES["bpe-base"]
    _, heldout = split_text(load_text(recipe.corpus), recipe.val_fraction)
    ids = tokenizer.encode_ordinary(heldout[:40_000])
    stride = len(ids) // (2 * N_PROMPTS)
    prompts = [torch.tensor([ids[i * stride:i * stride + PROMPT_TOKENS]], device=device) for i in range(2 * N_PROMPTS)]
    return target.to(device), draft.to(device), prompts


def _over(prompts: list[torch.Tensor], run: Callable[[torch.Tensor], object]) -> Callable[[], None]:
    def all_prompts() -> None:
        for p in prompts:
            run(p)
    return all_prompts


def _stats(target: GPT, draft: GPT, prompts: list[torch.Tensor], k: int, adaptive: bool = False) -> Stats:
    """Summed stats over ``prompts``; fails when a speculative output differs from target-only greedy."""
    total = Stats()
    for p in prompts:
        out = speculative_generate(target, draft, p, NEW_TOKENS, k, adaptive=adaptive)
        if not torch.equal(out.tokens, generate(target, p, NEW_TOKENS)):
            raise MeasurementError(f"speculative tokens (k={k}, adaptive={adaptive}) differ from target-only greedy")
        for name in ("drafted", "accepted", "rounds", "target_forwards", "draft_forwards"):
            setattr(total, name, getattr(total, name) + getattr(out.stats, name))
        total.ks += out.stats.ks
    return total


@torch.no_grad()
def forward_ms(model: GPT, prompt: torch.Tensor, tokens: int, repeats: int = 30) -> float:
    """Median milliseconds of one cached forward of ``tokens`` tokens after ``prompt`` (rolled back each time):
    what a decode step (1 token) and a verification (k + 1 tokens) cost."""
    cache = KVCache.for_model(model, 1, prompt.shape[1] + tokens)
    model(prompt, cache=cache)
    fed, times = prompt[:, :tokens], []
    for _ in range(repeats):
        start = time.perf_counter()
        model(fed, cache=cache)
        times.append(time.perf_counter() - start)
        cache.truncate(prompt.shape[1])
    return 1e3 * statistics.median(times)


def _hf_sides(target: GPT, draft: GPT, prompts: list[torch.Tensor]) -> tuple[dict[str, Callable[[], None]], dict]:
    """HF generate on the same weights, target alone and with the draft as assistant; or why not."""
    try:
        from reference.hf_gpt2 import to_hf

        hf_target, hf_draft = to_hf(target), to_hf(draft)
        kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}

        @torch.no_grad()
        def alone(p: torch.Tensor) -> torch.Tensor:
            return hf_target.generate(p, **kw)

        @torch.no_grad()
        def assisted(p: torch.Tensor) -> torch.Tensor:
            return hf_target.generate(p, assistant_model=hf_draft, **kw)

        same = sum(torch.equal(assisted(p), generate(target, p, NEW_TOKENS)) for p in prompts)
    except Exception as e:  # the peer is informational: its absence is recorded, not fatal
        return {}, {"hf_assisted": f"could not run: {e.__class__.__name__}: {str(e)[:200]}"}
    return ({"hf": _over(prompts, alone), "hf_assisted": _over(prompts, assisted)},
            {"hf_assisted_prompts_equal_to_our_greedy": f"{same} of {len(prompts)}"})


def generation_speedup(ctx: Context) -> Result:
    """time(target-only cached greedy) / time(speculative greedy at the k chosen on the tuning prompts)."""
    from impl.speculative_decoding import medusa

    target, draft, prompts = _models(ctx.device)
    tuning, measured = prompts[:N_PROMPTS], prompts[N_PROMPTS:]
    # 1. choose k on the tuning prompts (and plot speedup and acceptance against k)
    sides = {f"k={k}": _over(tuning, lambda p, k=k: speculative_generate(target, draft, p, NEW_TOKENS, k))
             for k in K_SWEEP}
    sweep = interleaved({"target": _over(tuning, lambda p: generate(target, p, NEW_TOKENS)), **sides},
                        rounds=2, warmup=1, device=ctx.device)
    sweep_speedup = [sweep.ratio("target", f"k={k}")[0] for k in K_SWEEP]
    sweep_acceptance = [_stats(target, draft, tuning, k).acceptance_rate for k in K_SWEEP]
    best_k = K_SWEEP[max(range(len(K_SWEEP)), key=lambda i: sweep_speedup[i])]
    # 2. the claim, on the other prompts, with every other drafter and the peer in the same rounds
    _, heads, _ = medusa.load()
    heads = heads.to(ctx.device)
    hf_fns, hf_details = _hf_sides(target, draft, measured)
    fns = {"target": _over(measured, lambda p: generate(target, p, NEW_TOKENS)),
           "speculative": _over(measured, lambda p: speculative_generate(target, draft, p, NEW_TOKENS, best_k)),
           "adaptive": _over(measured, lambda p: speculative_generate(target, draft, p, NEW_TOKENS, best_k,
                                                                       adaptive=True)),
           "medusa": _over(measured, lambda p: medusa.medusa_generate(target, heads, p, NEW_TOKENS)),
           **hf_fns}
    t = interleaved(fns, rounds=3 if ctx.quick else 5, warmup=1, device=ctx.device)
    value, spread = t.ratio("target", "speculative")
    fixed, adaptive = _stats(target, draft, measured, best_k), _stats(target, draft, measured, best_k, adaptive=True)
    medusa_stats = Stats()
    for p in measured:
        out = medusa.medusa_generate(target, heads, p, NEW_TOKENS)
        if not torch.equal(out.tokens, generate(target, p, NEW_TOKENS)):
            raise MeasurementError("Medusa-drafted tokens differ from target-only greedy")
        for name in ("drafted", "accepted", "rounds", "target_forwards"):
            setattr(medusa_stats, name, getattr(medusa_stats, name) + getattr(out.stats, name))
    costs = {f"target_T={n}": round(forward_ms(target, measured[0], n), 3) for n in (1, 2, best_k + 1, 5)}
    costs["draft_T=1"] = round(forward_ms(draft, measured[0], 1), 3)
    n_tokens = NEW_TOKENS * len(measured)
    tps = {name: round(n_tokens / t.median_s(name), 1) for name in fns}
    details = {
        "k": best_k, "k_chosen_on": f"{len(tuning)} other held-out prompts (sweep k = 1..8, 2 interleaved rounds)",
        "prompts": f"{len(measured)} x {PROMPT_TOKENS} held-out tokens, {NEW_TOKENS} new tokens each, greedy",
        "tokens_per_s": tps,
        "forward_ms": costs,
        "speculative": fixed.as_dict(),
        "adaptive_k": {**adaptive.as_dict(), "speedup": round(t.ratio("target", "adaptive")[0], 3),
                       "mean_k": round(statistics.mean(adaptive.ks), 2)},
        "medusa": {**medusa_stats.as_dict(), "heads": heads.n_heads,
                   "speedup": round(t.ratio("target", "medusa")[0], 3)},
        "sweep_k": K_SWEEP, "sweep_speedup": [round(s, 3) for s in sweep_speedup],
        "sweep_acceptance_rate": [round(a, 4) for a in sweep_acceptance],
        **hf_details,
    }
    if hf_fns:
        details["hf_assisted_speedup_over_hf_alone"] = round(t.ratio("hf", "hf_assisted")[0], 3)
    plots = [Plot("Speculative decoding: speedup and acceptance vs k (tuning prompts)", K_SWEEP,
                  {"speedup over target-only": sweep_speedup, "acceptance rate": sweep_acceptance},
                  xlabel="k (drafted tokens per round)", ylabel="x / fraction"),
             Plot("Greedy generation tokens/s (same rounds)", list(tps), {"tokens/s": list(tps.values())},
                  ylabel="tokens/s", kind="bar")]
    return Result(value=value, unit="x", spread=spread, details=details, plots=plots)
