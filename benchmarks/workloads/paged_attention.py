"""Project 13 claims: KV memory waste of the paged cache, and sequences served at once in a fixed KV
budget, paged blocks against contiguous max-length pre-allocation, on one mixed-length workload.

The workload (fixed before measuring): 64 requests, seed 0; prompt lengths lognormal with median 64
tokens and sigma 0.8, clipped to 4 .. 512; output lengths lognormal with median 96 and sigma 0.9,
clipped to 1 .. 448 (a long tail, like chat traffic); every request's cap is max_new_tokens = 448, and
its output length is not known to the server in advance (as with a stop token).

The server is a small FCFS loop: each step admits waiting requests in arrival order while their
tokens fit, prefills them, then decodes one token for every running request. The paged side holds
only the blocks its tokens fill and, when a decode step finds no free block, preempts the latest
admitted request (freed, re-queued first, recomputed from its prompt and its tokens so far: vLLM's
recompute). The contiguous side reserves prompt + 448 slots per request on admission (P8's
pre-allocation: the output length is unknown), so it never preempts. Both share one budget of KV
slots (8192; paged: 8192 / block_size blocks).

The paged side runs real forwards of a randomly initialised GPT through ``PagedKVCache`` (timing and
memory need no trained weights); which tokens come out does not change any length, so the figures
depend on the workload and the block size only, and the same bookkeeping run without forwards must
give the same figures (checked).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from harness.measure import Context, Plot, Result
from impl.gpt.model import GPT, GPTConfig
from impl.paged_attention.allocator import NoFreeBlocks
from impl.paged_attention.fast import PagedKVCache

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
def serve_paged(reqs: list[tuple[int, int]], block_size: int, model: GPT | None = None, device: str = "cpu") -> dict:
    """Serve ``reqs`` through a ``PagedKVCache`` of BUDGET_SLOTS slots; with ``model``, real forwards
    (greedy), else bookkeeping only. Per decode step: sequences running, waste after the forward."""
    num_blocks = BUDGET_SLOTS // block_size
    if model is not None:
        cache = PagedKVCache.for_model(model, num_blocks, block_size)
    else:
        cache = PagedKVCache(1, 1, 1, num_blocks, block_size)
    gen = torch.Generator().manual_seed(1)
    tokens = {i: torch.randint(4096, (p,), generator=gen).tolist() for i, (p, _) in enumerate(reqs)}
    produced = dict.fromkeys(range(len(reqs)), 0)
    waiting, running = deque(range(len(reqs))), []
    live, waste, preemptions = [], [], 0

    def forward(seqs: list[int], n_new: list[int]) -> None:
        cache.set_batch(seqs, n_new)
        if model is None:
            cache.advance(max(n_new))
            return
        T = max(n_new)
        idx = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, n_new, strict=True)):
            idx[b, :n] = torch.tensor(tokens[s][-n:])
        start = torch.tensor([cache.length(s) for s in seqs])[:, None]
        pos = (start + torch.arange(T)).clamp(max=model.config.block_size - 1)
        logits = model(idx.to(device), cache=cache, position_ids=pos.to(device))
        last = logits[torch.arange(len(seqs)), torch.tensor(n_new) - 1].argmax(-1).tolist()
        for s, t in zip(seqs, last, strict=True):
            tokens[s].append(t)

    def finish_done() -> None:
        for s in [s for s in running if produced[s] == reqs[s][1]]:
            running.remove(s)
            cache.free_sequence(s)

    while waiting or running:
        admitted = []
        while waiting:  # FCFS admission: the prompt (and any recomputed tokens) plus its first new token
            s = waiting[0]
            n = len(tokens[s]) if model is not None else reqs[s][0] + produced[s]
            if -(-(n + 1) // block_size) > cache.allocator.num_free:
                break
            waiting.popleft()
            cache.add_sequence(s)
            cache.reserve(s, n)
            admitted.append((s, n))
        for s, n in admitted:  # prefill: one forward per admitted request, its first new token
            forward([s], [n])
            produced[s] += 1
            running.append(s)
        finish_done()
        decoding = [s for s in running if s not in {a for a, _ in admitted}]
        for s in list(decoding):
            while s in running:
                try:
                    cache.reserve(s, 1)
                    break
                except NoFreeBlocks:  # preempt the latest admitted request: recompute it later
                    victim = running.pop()
                    cache.free_sequence(victim)
                    waiting.appendleft(victim)
                    preemptions += 1
                    if victim in decoding:
                        decoding.remove(victim)
        if decoding:
            forward(decoding, [1] * len(decoding))
            for s in decoding:
                produced[s] += 1
            live.append(len(running))
            waste.append(cache.waste())
        finish_done()
    return {"live": live, "waste": [w["waste"] for w in waste], "preemptions": preemptions,
            "reserved": [w["reserved_slots"] for w in waste], "used": [w["used_slots"] for w in waste]}


def serve_contiguous(reqs: list[tuple[int, int]]) -> dict:
    """The same FCFS loop where each request reserves prompt + MAX_NEW_TOKENS contiguous slots on
    admission (no preemption needed). Per decode step: sequences running, waste."""
    free = BUDGET_SLOTS
    produced = dict.fromkeys(range(len(reqs)), 0)
    waiting, running = deque(range(len(reqs))), []
    live, waste = [], []
    while waiting or running:
        admitted = []
        while waiting and reqs[waiting[0]][0] + MAX_NEW_TOKENS <= free:
            s = waiting.popleft()
            free -= reqs[s][0] + MAX_NEW_TOKENS
            produced[s] = 1  # prefill gives the first token
            admitted.append(s)
        running += admitted
        decoding = [s for s in running if s not in admitted and produced[s] < reqs[s][1]]
        for s in decoding:
            produced[s] += 1
        if decoding:
            reserved = sum(reqs[s][0] + MAX_NEW_TOKENS for s in running)
            used = sum(reqs[s][0] + produced[s] for s in running)
            live.append(len(running))
            waste.append((reserved - used) / reserved)
        for s in [s for s in running if produced[s] >= reqs[s][1]]:
            running.remove(s)
            free += reqs[s][0] + MAX_NEW_TOKENS
    return {"live": live, "waste": waste}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _serve_checked(ctx: Context) -> tuple[dict, dict, dict[int, dict]]:
    """The real-forward paged run at BLOCK_SIZE, the contiguous run, and bookkeeping runs of the sweep;
    fails when the real run and the bookkeeping run at the same block size disagree."""
    reqs = requests()
    paged = serve_paged(reqs, BLOCK_SIZE, model_for(ctx), ctx.device)
    sweep = {bs: serve_paged(reqs, bs) for bs in SWEEP_BLOCK_SIZES}
    if sweep[BLOCK_SIZE] != paged:
        raise AssertionError("the paged run with forwards and its bookkeeping replay disagree")
    return paged, serve_contiguous(reqs), sweep


def _workload_details(reqs: list[tuple[int, int]]) -> dict:
    prompts, outputs = [p for p, _ in reqs], [o for _, o in reqs]
    return {"requests": len(reqs), "prompt_tokens_mean": round(_mean(prompts), 1), "prompt_tokens_max": max(prompts),
            "output_tokens_mean": round(_mean(outputs), 1), "output_tokens_max": max(outputs),
            "max_new_tokens": MAX_NEW_TOKENS, "budget_slots": BUDGET_SLOTS, "block_size": BLOCK_SIZE}


def kv_waste(ctx: Context) -> Result:
    """Reserved-but-unused KV slots / reserved slots of the paged cache, mean over decode steps."""
    paged, contiguous, sweep = _serve_checked(ctx)
    value = _mean(paged["waste"])
    token_weighted = 1 - sum(paged["used"]) / sum(paged["reserved"])
    peak = paged["reserved"].index(max(paged["reserved"]))
    return Result(value=value, unit="", spread=(min(paged["waste"]), max(paged["waste"])), details={
        **_workload_details(requests()), "decode_steps": len(paged["waste"]), "preemptions": paged["preemptions"],
        "waste_token_weighted": round(token_weighted, 4), "waste_at_peak_reservation": round(paged["waste"][peak], 4),
        "contiguous_waste_mean": round(_mean(contiguous["waste"]), 4),
        **{f"waste_block_{bs}": round(_mean(r["waste"]), 4) for bs, r in sweep.items()},
        "spread_is": "min and max of the per-step waste"},
        plots=[Plot(title="KV waste vs block size (mean over decode steps)", x=SWEEP_BLOCK_SIZES,
                    series={"paged": [_mean(sweep[bs]["waste"]) for bs in SWEEP_BLOCK_SIZES],
                            "contiguous max-length": [_mean(contiguous["waste"])] * len(SWEEP_BLOCK_SIZES)},
                    xlabel="block size (tokens)", ylabel="reserved but unused / reserved", logx=True)])


def concurrency(ctx: Context) -> Result:
    """Mean sequences running per decode step in the fixed budget: paged / contiguous pre-allocation."""
    paged, contiguous, _ = _serve_checked(ctx)
    value = _mean(paged["live"]) / _mean(contiguous["live"])
    return Result(value=value, unit="x", details={
        **_workload_details(requests()), "paged_mean_live": round(_mean(paged["live"]), 2),
        "contiguous_mean_live": round(_mean(contiguous["live"]), 2), "paged_peak_live": max(paged["live"]),
        "contiguous_peak_live": max(contiguous["live"]), "peak_ratio": max(paged["live"]) / max(contiguous["live"]),
        "paged_decode_steps": len(paged["live"]), "contiguous_decode_steps": len(contiguous["live"]),
        "paged_preemptions": paged["preemptions"]},
        plots=[Plot(title="Sequences running per decode step (8192 KV slots)",
                    x=list(range(max(len(paged["live"]), len(contiguous["live"])))),
                    series={"paged": paged["live"] + [0] * (len(contiguous["live"]) - len(paged["live"])),
                            "contiguous": contiguous["live"] + [0] * (len(paged["live"]) - len(contiguous["live"]))},
                    xlabel="decode step", ylabel="sequences running")])
