"""Project 13 claims: KV memory waste of the paged cache, and sequences served at once in a fixed KV
budget, paged blocks against contiguous max-length pre-allocation, on one mixed-length workload.

The workload (fixed before measuring): 64 requests, seed 0; prompt lengths lognormal with median 64
tokens and sigma 0.8, clipped to 4 .. 512; output lengths lognormal with median 96 and sigma 0.9,
clipped to 1 .. 448 (a long tail, like chat traffic); every request's cap is max_new_tokens = 448, and
its output length is not known to the server in advance (as with a stop token).

Both sides are the engine of ``impl/engine`` (``Engine``: FCFS admission, continuous batching, no row
limit, prefill in one chunk) serving the requests in one budget of KV slots (8192; block_size-token
blocks). The paged side holds only the blocks its tokens fill and, when a decode step finds no free
block, preempts the latest admitted request (freed, re-queued first, recomputed from its prompt and its
tokens so far: vLLM's recompute). The contiguous side is the same engine told to pre-allocate
(``preallocate=448``): on admission it reserves prompt + 448 slots, the longest the request may become
(P8's pre-allocation: the output length is unknown), so it never preempts.

Forwards are real, of a randomly initialised GPT (timing and memory need no trained weights); which
tokens come out does not change any length, so the figures depend on the workload, the block size and
the engine's policy only (the same in quick and full mode, whose models differ in size only).
"""

from __future__ import annotations

import math

import torch

from harness.measure import Context, Plot, Result
from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.gpt.model import GPT, GPTConfig

N_REQUESTS = 64
MAX_NEW_TOKENS = 448
BUDGET_SLOTS = 8192
BLOCK_SIZE = 16
SWEEP_BLOCK_SIZES = [8, 16, 32, 64]


def requests(seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) of the 64 requests, from the seeded long-tailed distribution."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.empty(N_REQUESTS).log_normal_(math.log(64), 0.8, generator=gen)
    output = torch.empty(N_REQUESTS).log_normal_(math.log(96), 0.9, generator=gen)
    return [(int(min(max(round(float(p)), 4), 512)), int(min(max(round(float(o)), 1), MAX_NEW_TOKENS)))
            for p, o in zip(prompt, output, strict=True)]


def model_for(ctx: Context) -> GPT:
    """bpe-base's shape (vocab 4096, 6 layers, 4 heads, 256 wide), 1024 positions; quick: 1 layer, 2
    heads, 64 wide (the lengths, hence every figure, do not depend on the model)."""
    shape = dict(n_layer=1, n_head=2, n_embd=64) if ctx.quick else dict(n_layer=6, n_head=4, n_embd=256)
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=4096, block_size=1024, **shape)).to(ctx.device).eval()


@torch.no_grad()
def serve(reqs: list[tuple[int, int]], block_size: int, model: GPT, preallocate: int | None = None) -> dict:
    """Serve ``reqs`` through the engine in BUDGET_SLOTS KV slots; after every step that decoded: the
    sequences running, the cache's waste (reserved but unused / reserved slots), whether requests waited."""
    engine = Engine(model, max_num_seqs=len(reqs), max_batched_tokens=BUDGET_SLOTS, block_size=block_size,
                    num_blocks=BUDGET_SLOTS // block_size, preallocate=preallocate)
    gen = torch.Generator().manual_seed(1)
    for p, o in reqs:
        engine.add_request(torch.randint(model.config.vocab_size, (p,), generator=gen), SamplingParams(max_tokens=o))
    live, waste, reserved, used, queued = [], [], [], [], []
    while engine.has_unfinished():
        engine.step()
        if engine.running:
            books = engine.cache.waste()
            live.append(len(engine.running))
            waste.append(books["waste"])
            reserved.append(books["reserved_slots"])
            used.append(books["used_slots"])
            queued.append(bool(engine.waiting))
    return {"live": live, "waste": waste, "reserved": reserved, "used": used, "queued": queued,
            "preemptions": engine.counters["preemptions"], "steps": engine.counters["steps"]}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _serve_all(ctx: Context) -> tuple[dict, dict, dict[int, dict]]:
    """The paged runs at every block size of the sweep (BLOCK_SIZE among them) and the contiguous run."""
    reqs, model = requests(), model_for(ctx)
    sweep = {bs: serve(reqs, bs, model) for bs in SWEEP_BLOCK_SIZES}
    return sweep[BLOCK_SIZE], serve(reqs, BLOCK_SIZE, model, preallocate=MAX_NEW_TOKENS), sweep


def _workload_details(reqs: list[tuple[int, int]]) -> dict:
    prompts, outputs = [p for p, _ in reqs], [o for _, o in reqs]
    return {"requests": len(reqs), "prompt_tokens_mean": round(_mean(prompts), 1), "prompt_tokens_max": max(prompts),
            "output_tokens_mean": round(_mean(outputs), 1), "output_tokens_max": max(outputs),
            "max_new_tokens": MAX_NEW_TOKENS, "budget_slots": BUDGET_SLOTS, "block_size": BLOCK_SIZE}


def kv_waste(ctx: Context) -> Result:
    """Reserved-but-unused KV slots / reserved slots of the paged cache, mean over decode steps."""
    paged, contiguous, sweep = _serve_all(ctx)
    value = _mean(paged["waste"])
    token_weighted = 1 - sum(paged["used"]) / sum(paged["reserved"])
    peak = paged["reserved"].index(max(paged["reserved"]))
    return Result(value=value, unit="", details={
        **_workload_details(requests()), "steps": len(paged["waste"]), "preemptions": paged["preemptions"],
        "waste_token_weighted": round(token_weighted, 4), "waste_at_peak_reservation": round(paged["waste"][peak], 4),
        "contiguous_waste_mean": round(_mean(contiguous["waste"]), 4),
        **{f"waste_block_{bs}": round(_mean(r["waste"]), 4) for bs, r in sweep.items()},
        "waste_min_step": round(min(paged["waste"]), 4), "waste_max_step": round(max(paged["waste"]), 4)},
        plots=[Plot(title="KV waste vs block size (mean over decode steps)", x=SWEEP_BLOCK_SIZES,
                    series={"paged": [_mean(sweep[bs]["waste"]) for bs in SWEEP_BLOCK_SIZES],
                            "contiguous max-length": [_mean(contiguous["waste"])] * len(SWEEP_BLOCK_SIZES)},
                    xlabel="block size (tokens)", ylabel="reserved but unused / reserved", logx=True)])


def concurrency(ctx: Context) -> Result:
    """Mean sequences running per decode step in the fixed budget: paged / contiguous pre-allocation."""
    paged, contiguous, _ = _serve_all(ctx)
    value = _mean(paged["live"]) / _mean(contiguous["live"])
    return Result(value=value, unit="x", details={
        **_workload_details(requests()), "paged_mean_live": round(_mean(paged["live"]), 2),
        "contiguous_mean_live": round(_mean(contiguous["live"]), 2), "paged_peak_live": max(paged["live"]),
        "contiguous_peak_live": max(contiguous["live"]), "peak_ratio": max(paged["live"]) / max(contiguous["live"]),
        "paged_steps": len(paged["live"]), "contiguous_steps": len(contiguous["live"]),
        "paged_preemptions": paged["preemptions"],
        "paged_mean_live_while_requests_wait": round(_mean([n for n, q in zip(paged["live"], paged["queued"],
                                                                            strict=True) if q] or [0]), 2),
        "contiguous_mean_live_while_requests_wait": round(_mean([n for n, q in zip(
            contiguous["live"], contiguous["queued"], strict=True) if q] or [0]), 2)},
        plots=[Plot(title="Sequences running per decode step (8192 KV slots)",
                    x=list(range(max(len(paged["live"]), len(contiguous["live"])))),
                    series={"paged": paged["live"] + [0] * (len(contiguous["live"]) - len(paged["live"])),
                            "contiguous": contiguous["live"] + [0] * (len(paged["live"]) - len(contiguous["live"]))},
                    xlabel="decode step", ylabel="sequences running")])
