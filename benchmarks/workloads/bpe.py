"""Project 2 claims: training time of the 10K tokenizer against HF tokenizers' trainer, fast vs
naive trainer, encode speed against HF tokenizers (tiktoken in the details), and held-out
compression against HF's trainer. Every race times both sides in the same process, and a side
that produced different output than the other is an error, not a figure.

The 10K tokenizer is trained on the first 90% of the default corpus (Shakespeare's complete
works) and every figure about it is measured on the last 10%, which it never saw.
"""

from __future__ import annotations

import functools
import os
import time

from harness.measure import Context, MeasurementError, Plot, Result, interleaved, require_positive
from impl.bpe import fast, naive
from impl.bpe.pipeline import training_text
from impl.bpe.regex_split import GPT4_SPLIT_PATTERN
from impl.bpe.tokenizer import ENDOFTEXT, Tokenizer, train
from impl.data.corpus import load_text, split_text
from reference import hf_bpe, tiktoken_bpe

VOCAB_SIZE = 10_000


def _mb(text: str) -> float:
    return len(text.encode("utf-8")) / 1e6


def _first_difference(a: list, b: list) -> int:
    """Index of the first position where ``a`` and ``b`` differ (the shorter length if one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, str]:
    """(train text, held-out text) of the default corpus, split 90/10."""
    return split_text(load_text("shakespeare"))


@functools.lru_cache(maxsize=1)
def _ten_k() -> Tokenizer:
    return train(_corpus()[0], VOCAB_SIZE, "gpt4", [ENDOFTEXT], trainer="fast")


def train_10k(ctx: Context) -> Result:
    """time(our fast trainer) / time(HF tokenizers' trainer) learning the 10K vocabulary from the
    same text with the same split regex, interleaved rounds in one process (1 quick, 3 full)."""
    text, source = training_text("shakespeare")
    learned: dict[str, object] = {}

    def ours() -> None:
        learned["ours"] = fast.train_merges(text, VOCAB_SIZE, GPT4_SPLIT_PATTERN, [ENDOFTEXT])

    def hf() -> None:
        learned["hf"] = hf_bpe.train_tokenizer(text, VOCAB_SIZE, GPT4_SPLIT_PATTERN, [ENDOFTEXT])

    rounds = 1 if ctx.quick else 3
    timings = interleaved({"ours": ours, "hf": hf}, rounds=rounds, warmup=0)
    ratio, spread = timings.ratio("ours", "hf")
    tok = Tokenizer(learned["ours"], "gpt4", [ENDOFTEXT])
    hf_vocab = learned["hf"].get_vocab_size()
    if tok.vocab_size != VOCAB_SIZE or hf_vocab != VOCAB_SIZE:
        raise MeasurementError(f"the trainers did not both learn {VOCAB_SIZE:,} ids (ours {tok.vocab_size:,}, "
                               f"HF {hf_vocab:,}): the times are not of the same work")
    heldout = _corpus()[1]
    return Result(
        value=require_positive("time ratio ours / HF trainer", ratio),
        unit="x",
        spread=spread,
        details={
            "corpus": source,
            "train_characters": len(text),
            "train_megabytes": round(_mb(text), 2),
            "vocab_size": tok.vocab_size,
            "merges": len(learned["ours"]),
            "rounds": rounds,
            "ours_s": [round(s, 2) for s in timings.seconds["ours"]],
            "hf_tokenizers_s": [round(s, 2) for s in timings.seconds["hf"]],
            "cpu_cores": os.cpu_count(),
            "threads": "ours: 1 (Python); HF: its Rust thread pool, one thread per core",
            "heldout_bytes_per_token": round(_mb(heldout) * 1e6 / len(tok.encode_ordinary(heldout)), 3),
            "command": "python -m impl.bpe train --vocab-size 10000 --corpus shakespeare",
        },
    )


def trainer_speedup(ctx: Context) -> Result:
    """time(naive trainer) / time(fast trainer) on the same text and vocabulary, interleaved rounds."""
    chars, vocab_size, rounds = (30_000, 256 + 48, 3) if ctx.quick else (150_000, 256 + 150, 3)
    text = _corpus()[0][:chars]
    learned = {}  # each trainer's last result: compared afterwards, so no extra naive run is spent

    def timed(name: str, trainer):
        def run() -> None:
            learned[name] = trainer(text, vocab_size, GPT4_SPLIT_PATTERN)

        return run

    timings = interleaved(
        {"naive": timed("naive", naive.train_merges), "fast": timed("fast", fast.train_merges)}, rounds=rounds, warmup=0
    )
    if learned["naive"] != learned["fast"]:
        raise MeasurementError(f"naive and fast trainers learned different merges (first difference at merge "
                               f"{_first_difference(learned['naive'], learned['fast'])}): the fast side did "
                               f"different work, so its time means nothing")
    speedup, spread = timings.ratio("naive", "fast")
    return Result(
        value=speedup,
        unit="x",
        spread=spread,
        details={
            "text_characters": chars,
            "vocab_size": vocab_size,
            "merges": vocab_size - 256,
            "rounds": rounds,
            "naive_s": round(timings.median_s("naive"), 3),
            "fast_s": round(timings.median_s("fast"), 4),
        },
        plots=[
            Plot(
                "Trainer time (same text and vocabulary)",
                [0, 1],
                {"seconds": [timings.median_s("naive"), timings.median_s("fast")]},
                xlabel="naive (recount per merge) | fast (incremental + heap)",
                ylabel="seconds",
                kind="bar",
            )
        ],
    )


def encode_race(ctx: Context) -> Result:
    """Our fast encoder's MB/s over HF tokenizers' (one ``encode`` call each, same merges, pattern and
    held-out text); tiktoken's figure in the details. Ids that differ between any two are an error."""
    tok = _ten_k()
    text = _corpus()[1]
    ours = fast.FastEncoder(tok.merges, tok.pattern)
    tik = tiktoken_bpe.encoding(tok.merges, tok.pattern)
    hf = hf_bpe.from_merges(tok.merges, tok.pattern)

    def ours_cold() -> list[int]:
        ours.cache.clear()  # every timed call starts from an empty cache: a single pass over new text
        return ours.encode_ordinary(text)

    fns = {
        "ours": ours_cold,
        "hf": lambda: hf_bpe.encode_ids(hf, text),
        "tiktoken": lambda: tik.encode_ordinary(text),
    }
    ids = {name: fn() for name, fn in fns.items()}
    for name in ("hf", "tiktoken"):
        if ids[name] != ids["ours"]:
            raise MeasurementError(f"our ids and {name}'s differ (first at position "
                                   f"{_first_difference(ids['ours'], ids[name])}, lengths "
                                   f"{len(ids['ours'])} and {len(ids[name])}): the encoders did different work")
    timings = interleaved(fns, rounds=5 if ctx.quick else 9, warmup=1)
    ratio, spread = timings.ratio("hf", "ours")  # time(hf)/time(ours) = our MB/s / HF's
    mb = _mb(text)
    mbps = {name: mb / timings.median_s(name) for name in fns}
    start = time.perf_counter()
    ours.encode_ordinary(text)  # cache now full: the steady state of a long-running encoder
    warm = mb / (time.perf_counter() - start)
    return Result(
        value=require_positive("MB/s ratio ours / HF", ratio),
        unit="x",
        spread=spread,
        details={
            "text_megabytes": round(mb, 3),
            "vocab_size": tok.vocab_size,
            "tokens": len(ids["ours"]),
            "ours_mb_per_s (cold cache)": round(mbps["ours"], 2),
            "ours_mb_per_s (warm cache)": round(warm, 2),
            "hf_tokenizers_mb_per_s": round(mbps["hf"], 2),
            "tiktoken_mb_per_s": round(mbps["tiktoken"], 2),
            "ours_over_tiktoken": round(timings.ratio("tiktoken", "ours")[0], 3),
        },
        plots=[
            Plot(
                "Encode throughput, same 10K merges, held-out Shakespeare",
                [0, 1, 2],
                {"MB/s": [mbps["ours"], mbps["hf"], mbps["tiktoken"]]},
                xlabel="ours (Python, cold cache) | HF tokenizers (Rust) | tiktoken (Rust)",
                ylabel="MB/s",
                kind="bar",
            )
        ],
    )


def compression_vs_hf(ctx: Context) -> Result:
    """Held-out bytes per token, ours / HF tokenizers' trainer, same text, regex and vocabulary size."""
    train_text, heldout = _corpus()
    tok = _ten_k()
    start = time.perf_counter()
    hf = hf_bpe.train_tokenizer(train_text, VOCAB_SIZE, GPT4_SPLIT_PATTERN, [ENDOFTEXT])
    hf_seconds = time.perf_counter() - start
    n_bytes = len(heldout.encode("utf-8"))
    ours_bpt = n_bytes / len(tok.encode_ordinary(heldout))
    hf_bpt = hf_bpe.bytes_per_token(hf, heldout)
    tik_bpt = n_bytes / len(tiktoken_bpe.encoding(tok.merges, tok.pattern).encode_ordinary(heldout))
    return Result(
        value=ours_bpt / hf_bpt,
        unit="x",
        details={
            "heldout_megabytes": round(n_bytes / 1e6, 3),
            "vocab_size": VOCAB_SIZE,
            "ours_bytes_per_token": round(ours_bpt, 4),
            "hf_bytes_per_token": round(hf_bpt, 4),
            "tiktoken_with_our_merges_bytes_per_token": round(tik_bpt, 4),
            "ours_train_s": round(tok.metadata["train_seconds"], 2),
            "hf_train_s": round(hf_seconds, 2),
        },
    )
