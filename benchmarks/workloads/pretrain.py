"""Project 3 claims: what gradient checkpointing saves, how far a CPU pre-training run gets,
and how fast the 125M model trains here."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable

import numpy as np
import torch

from harness.measure import Context, Plot, Result, interleaved, peak_memory_bytes, quartiles
from impl.bpe import load
from impl.char_gpt.train import full_split_loss
from impl.gpt.model import GPT, GPTConfig
from impl.pretrain.config import gpt_125m, train_preset
from impl.pretrain.data import prepare
from impl.pretrain.naive import loss_and_grads
from impl.pretrain.train import pretrain, sample_text
from impl.train.loop import make_optimizer, train_step

MiB = 2**20


def _random_batch(vocab_size: int, batch: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _release_freed_memory() -> bool:
    """Make glibc serve every allocation of 64 KiB or more from its own mapping, returned to the
    OS on free, so the resident set follows the live tensors. By default glibc raises that
    threshold as tensors are freed and keeps freed blocks in a fragmented heap: the resident set
    then also counts memory torch no longer holds. False where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1
    except (OSError, AttributeError):
        return False


def forward_backward(checkpointing: bool, n_layer: int, n_embd: int, seq_len: int, batch: int,
                     vocab_size: int, live_memory: bool = True) -> Callable[[], object]:
    """Setup for ``peak_memory_bytes``: a GPT and one batch; the closure runs forward + backward.

    ``live_memory`` measures the tensors held (freed memory returned to the OS); False keeps
    glibc's default allocator policy. A warm-up on 8 tokens runs first: the first
    ``torch.utils.checkpoint`` call imports modules worth ~150 MiB, which is not activation
    memory. Its gradients are freed again, so the measured call pays for its own.
    """
    if live_memory and not _release_freed_memory():
        raise RuntimeError("live_memory needs glibc's mallopt; measure with live_memory=False")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=n_layer, n_head=n_embd // 64,
                          n_embd=n_embd, gradient_checkpointing=checkpointing))
    loss_and_grads(model, *_random_batch(vocab_size, 1, 8))
    model.zero_grad(set_to_none=True)
    idx, targets = _random_batch(vocab_size, batch, seq_len)
    return lambda: loss_and_grads(model, idx, targets)


def _memory_plot(lengths: list[int], peaks: dict[str, list[float]]) -> Plot:
    title = "Peak memory of forward + backward"
    if len(lengths) == 1:  # quick mode: one length, one bar per series
        return Plot(f"{title} (sequence {lengths[0]})", [float(i) for i in range(len(peaks))],
                    {"MiB": [series[0] for series in peaks.values()]}, xlabel=" | ".join(peaks),
                    ylabel="MiB above baseline", kind="bar")
    return Plot(title, [float(n) for n in lengths], peaks, xlabel="sequence length",
                ylabel="MiB above baseline")


def checkpointing_memory(ctx: Context) -> Result:
    """Peak memory of one forward + backward at sequence 1024, checkpointed / not: the live
    tensors (the claim), and the resident set under glibc's default allocator (a detail)."""
    shape = dict(n_layer=24, n_embd=256, batch=1, vocab_size=10_000)
    lengths = [1024] if ctx.quick else [256, 512, 1024]
    variants = {"full activations": (False, True), "checkpointing": (True, True)}
    if not ctx.quick:
        variants |= {"full activations, default malloc": (False, False),
                     "checkpointing, default malloc": (True, False)}
    peaks: dict[str, list[float]] = {name: [] for name in variants}
    for seq_len in lengths:
        for name, (checkpointing, live) in variants.items():
            peak = peak_memory_bytes("benchmarks.workloads.pretrain:forward_backward",
                                     checkpointing=checkpointing, live_memory=live, seq_len=seq_len, **shape)
            peaks[name].append(peak / MiB)
    at_1024 = {name: series[-1] for name, series in peaks.items()}
    return Result(
        value=at_1024["checkpointing"] / at_1024["full activations"],
        unit="x",
        details={
            **{f"peak MiB {name}": round(v, 1) for name, v in at_1024.items()},
            **({"ratio with default malloc": round(at_1024["checkpointing, default malloc"]
                                                   / at_1024["full activations, default malloc"], 3)}
               if not ctx.quick else {}),
            "model": f"{shape['n_layer']} layers x {shape['n_embd']} wide, vocab {shape['vocab_size']:,}",
            "batch x sequence": f"{shape['batch']} x 1024",
            "measured": "VmHWM above the post-setup baseline, a fresh subprocess each",
        },
        plots=[_memory_plot(lengths, peaks)],
    )


def unigram_loss(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) on ``val_ids`` of token frequencies counted on ``train_ids`` (add-one):
    the yardstick a model must beat to have learnt anything about context."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[np.asarray(val_ids, dtype=np.int64)].mean())


def cpu_pretraining(ctx: Context) -> Result:
    """Pre-train the ``small`` preset on Shakespeare with our 10K BPE; val loss over ln(vocab)."""
    tokens = prepare(progress=False)
    quick = dict(max_iters=250, lr_decay_iters=250, eval_interval=50) if ctx.quick else {}
    model_cfg, train_cfg = train_preset("small", **quick)
    model_cfg.vocab_size = tokens.vocab_size
    iters = train_cfg.max_iters
    model, result = pretrain(tokens, model_cfg, train_cfg, progress=False)
    val_ids = tokens.val if not ctx.quick else tokens.val[: 32 * 1024]
    val = full_split_loss(model, val_ids)  # fp32: bf16 autocast trains fp32 master weights
    ln_vocab = math.log(tokens.vocab_size)
    unigram = unigram_loss(tokens.train, val_ids, tokens.vocab_size)
    steps = result.step_losses
    sample = sample_text(model, load(tokens.meta["tokenizer"]), "ROMEO.\n", n_tokens=100, seed=0)
    return Result(
        value=val / ln_vocab,
        details={
            "val_loss_nats": round(val, 4),
            "ln_vocab": round(ln_vocab, 4),
            "unigram_val_loss_nats": round(unigram, 4),
            "val_tokens_scored": len(val_ids),
            "iters": iters,
            "tokens_seen": iters * train_cfg.batch_size * train_cfg.block_size,
            "wall_s": round(result.wall_s, 1),
            "tokens_per_s": round(result.tokens_per_s),
            "parameters": model.num_params(),
            "dtype": train_cfg.dtype,
            "corpus": tokens.meta["corpus"],
        },
        plots=[
            Plot("Pre-training loss (small preset, BPE 10K)", [float(r["iter"]) for r in result.history],
                 {"train (estimate)": [r["train_loss"] for r in result.history],
                  "val (estimate)": [r["val_loss"] for r in result.history],
                  "ln(vocab)": [ln_vocab] * len(result.history),
                  "unigram model": [unigram] * len(result.history)},
                 xlabel="iteration", ylabel="loss (nats)"),
            Plot("Step loss", [float(i) for i, _ in steps], {"step loss": [loss for _, loss in steps]},
                 xlabel="iteration", ylabel="loss (nats)"),
        ],
        text="ROMEO.\n" + sample,
    )


def throughput_125m(ctx: Context) -> Result:
    """Tokens per second of one AdamW step (forward, backward, clip, step) of the 125M model on
    batch 1 x 1024, fp32; bf16 autocast (and, in full mode, fp32 with checkpointing) as details."""
    seq_len = 1024
    torch.manual_seed(0)
    model = GPT(gpt_125m())
    optimizer = make_optimizer(model, train_preset("125m")[1])
    idx, targets = _random_batch(model.config.vocab_size, 1, seq_len)

    def step(dtype: str, checkpointing: bool) -> None:
        model.config.gradient_checkpointing = checkpointing
        train_step(model, optimizer, [(idx, targets)], dtype, grad_clip=1.0)

    fns = {"fp32": lambda: step("fp32", False), "bf16 autocast": lambda: step("bf16", False)}
    if not ctx.quick:
        fns["fp32 + checkpointing"] = lambda: step("fp32", True)
    timings = interleaved(fns, rounds=1 if ctx.quick else 3, warmup=1)  # warm-up allocates AdamW state
    per_s = {name: [seq_len / s for s in timings.seconds[name]] for name in fns}
    q1, med, q3 = quartiles(per_s["fp32"])
    return Result(
        value=med,
        unit="tokens/s",
        spread=(q1, q3),
        details={
            **{f"tokens_per_s {name}": round(quartiles(v)[1], 1) for name, v in per_s.items()},
            **{f"step_s {name}": round(timings.median_s(name), 2) for name in fns},
            "parameters": model.num_params(),
            "batch": f"1 x {seq_len} tokens",
            "threads": torch.get_num_threads(),
        },
        plots=[Plot("125M training step, batch 1 x 1024", [float(i) for i in range(len(fns))],
                    {"tokens/s": [quartiles(per_s[name])[1] for name in fns]}, xlabel=" | ".join(fns),
                    ylabel="tokens/s", kind="bar")],
    )
