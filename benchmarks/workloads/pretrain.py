"""Project 3 claims: what gradient checkpointing saves, how far a CPU pre-training run gets,
and how fast the 125M model trains here against HF transformers' GPT-2 of the same shape."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from harness.measure import (
    Context,
    MeasurementError,
    Plot,
    Result,
    interleaved,
    peak_memory_bytes,
    quartiles,
    require_positive,
)
from impl.bpe import load
from impl.data.corpus import load_text, split_text
from impl.gpt.model import GPT, GPTConfig
from impl.pretrain.config import gpt_125m, train_preset
from impl.pretrain.data import prepare
from impl.pretrain.naive import loss_and_grads
from impl.pretrain.train import pretrain, sample_text
from impl.train.evaluate import bits_per_byte, evaluate_ids, full_split_loss
from impl.train.loop import make_optimizer, train_step
from impl.zoo import load as load_zoo_model
from impl.zoo.recipes import encode, token_nbytes
from reference import hf_gpt2_train

MiB = 2**20
ALLOCATORS = ("trim", "default")  # judged on "trim"; glibc's own policy reported beside it


def _random_batch(vocab_size: int, batch: int, seq_len: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return ids[:, :-1], ids[:, 1:]


def forward_backward(checkpointing: bool, seq_len: int, device: str = "cpu", n_layer: int = 24, n_embd: int = 256,
                     batch: int = 1, vocab_size: int = 10_000, preset: str = "") -> Callable[[], object]:
    """Setup for ``peak_memory_bytes``: a GPT on ``device`` and one batch; the closure runs forward +
    backward and returns the gradients (so they count in the peak).

    ``preset="125m"`` builds ``gpt_125m`` instead of the ``n_layer`` x ``n_embd`` shape. A warm-up on 8
    tokens runs first: the first ``torch.utils.checkpoint`` call imports modules worth ~150 MiB, which
    is not activation memory. Its gradients are freed again, so the measured call pays for its own.
    """
    torch.manual_seed(0)
    if preset == "125m":
        config = gpt_125m(gradient_checkpointing=checkpointing)
    else:
        config = GPTConfig(vocab_size=vocab_size, block_size=seq_len, n_layer=n_layer, n_head=n_embd // 64,
                           n_embd=n_embd, gradient_checkpointing=checkpointing)
    model = GPT(config).to(device)
    loss_and_grads(model, *_random_batch(config.vocab_size, 1, 8, device))
    model.zero_grad(set_to_none=True)
    idx, targets = _random_batch(config.vocab_size, batch, seq_len, device)
    return lambda: loss_and_grads(model, idx, targets)


def _memory_plot(lengths: list[int], peaks: dict[str, list[float]]) -> Plot:
    title = "Peak memory of forward + backward (24 x 256)"
    if len(lengths) == 1:  # quick mode: one length, one bar per series
        return Plot(f"{title}, sequence {lengths[0]}", [float(i) for i in range(len(peaks))],
                    {"MiB": [series[0] for series in peaks.values()]}, xlabel=" | ".join(peaks),
                    ylabel="MiB above baseline", kind="bar")
    return Plot(title, [float(n) for n in lengths], peaks, xlabel="sequence length",
                ylabel="MiB above baseline")


def _pair(device: str, allocator: str, **setup: object) -> dict[str, float]:
    """MiB peaks of forward + backward without and with checkpointing, one fresh subprocess each."""
    target = "benchmarks.workloads.pretrain:forward_backward"
    return {name: peak_memory_bytes(target, allocator=allocator, checkpointing=ckpt, device=device, **setup) / MiB
            for name, ckpt in (("full", False), ("checkpointing", True))}


def checkpointing_memory(ctx: Context) -> Result:
    """Peak memory of one forward + backward at sequence 1024, checkpointed / not (24 x 256, vocab
    10K), with glibc returning freed blocks to the OS (allocator "trim", the claim); glibc's default
    policy in the details, and in full mode the 125M model at sequence 1024 under both allocators."""
    lengths = [1024] if ctx.quick else [256, 512, 1024]
    peaks: dict[str, list[float]] = {}
    for allocator in ALLOCATORS:
        for seq_len in lengths:
            for name, mib in _pair(ctx.device, allocator, seq_len=seq_len).items():
                peaks.setdefault(f"{name} ({allocator})", []).append(mib)
    at_1024 = {name: series[-1] for name, series in peaks.items()}
    ratio = {a: at_1024[f"checkpointing ({a})"] / at_1024[f"full ({a})"] for a in ALLOCATORS}
    details: dict[str, object] = {
        **{f"peak MiB {name}": round(v, 1) for name, v in at_1024.items()},
        "ratio (default allocator)": round(ratio["default"], 3),
        "model": "24 layers x 256 wide, vocab 10,000; batch 1 x 1024",
        "measured": "peak above the post-setup baseline, a fresh subprocess each (CPU: VmHWM; CUDA: "
                    "max_memory_allocated); allocator trim = glibc M_MMAP_THRESHOLD 64 KiB",
    }
    if not ctx.quick:  # one 125M subprocess took 90 s wall (24 s of CPU) on the busy 2-core machine
        big = {a: _pair(ctx.device, a, seq_len=1024, preset="125m") for a in ALLOCATORS}
        details |= {f"125M peak MiB {name} ({a})": round(v, 1) for a, pair in big.items() for name, v in pair.items()}
        details |= {f"125M ratio ({a})": round(big[a]["checkpointing"] / big[a]["full"], 3) for a in ALLOCATORS}
        details |= {f"ratio at {n} ({a})": round(peaks[f"checkpointing ({a})"][i] / peaks[f"full ({a})"][i], 3)
                    for a in ALLOCATORS for i, n in enumerate(lengths)}
    return Result(value=ratio["trim"], unit="x", details=details, plots=[_memory_plot(lengths, peaks)])


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
    model, result = pretrain(tokens, model_cfg, train_cfg, device=ctx.device, progress=False)
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
            "device": ctx.device,
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
    """Our 125M model's training throughput over HF ``GPT2LMHeadModel``'s of the same shape: one AdamW
    step (forward, backward, clip, step) on the same batch 1 x 1024, fp32, no checkpointing, steps
    interleaved in one process. bf16 autocast (and, in full mode, checkpointing) as details."""
    seq_len = 1024
    config = gpt_125m()
    recipe = train_preset("125m")[1]
    torch.manual_seed(0)
    model = GPT(config).to(ctx.device)
    optimizer = make_optimizer(model, recipe)
    shape = dict(vocab_size=config.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                 n_head=config.n_head, n_embd=config.n_embd)
    hf = hf_gpt2_train.build(**shape, device=ctx.device)
    hf_optimizer = hf_gpt2_train.adamw(hf, recipe.learning_rate, (recipe.beta1, recipe.beta2), recipe.weight_decay)
    if model.num_params() != hf.num_parameters():
        raise MeasurementError(f"our model has {model.num_params():,} parameters and HF's {hf.num_parameters():,}: "
                               f"not the same shape, so their speeds cannot be compared")
    idx, targets = _random_batch(config.vocab_size, 1, seq_len, ctx.device)

    def ours(dtype: str, checkpointing: bool) -> Callable[[], None]:
        def step() -> None:
            model.config.gradient_checkpointing = checkpointing
            train_step(model, optimizer, [(idx, targets)], dtype, grad_clip=1.0)
        return step

    fns = {"ours fp32": ours("fp32", False),
           "HF fp32": lambda: hf_gpt2_train.train_step(hf, hf_optimizer, idx, targets, grad_clip=1.0)}
    if not ctx.quick:
        fns |= {"ours bf16 autocast": ours("bf16", False),
                "HF bf16 autocast": lambda: hf_gpt2_train.train_step(hf, hf_optimizer, idx, targets,
                                                                     torch.bfloat16, grad_clip=1.0),
                "ours fp32 + checkpointing": ours("fp32", True)}
    # the warm-up step allocates AdamW's moments; quick: 2 rounds, full: 3
    timings = interleaved(fns, rounds=2 if ctx.quick else 3, warmup=1, device=ctx.device)
    per_s = {name: [seq_len / s for s in timings.seconds[name]] for name in fns}
    ratio, spread = timings.ratio("HF fp32", "ours fp32")  # time(HF)/time(ours) = our tokens/s / HF's
    return Result(
        value=require_positive("throughput ratio ours / HF", ratio),
        unit="x",
        spread=spread,
        details={
            **{f"tokens_per_s {name}": round(quartiles(v)[1], 1) for name, v in per_s.items()},
            **{f"step_s {name}": round(timings.median_s(name), 2) for name in fns},
            "parameters ours": model.num_params(),
            "parameters HF": hf.num_parameters(),
            "batch": f"1 x {seq_len} tokens",
            "device": ctx.device,
            "threads": torch.get_num_threads(),
        },
        plots=[Plot("125M training step, batch 1 x 1024", [float(i) for i in range(len(fns))],
                    {"tokens/s": [quartiles(per_s[name])[1] for name in fns]}, xlabel=" | ".join(fns),
                    ylabel="tokens/s", kind="bar")],
    )


def _zoo_result(name: str, ctx: Context) -> tuple[Result, dict[str, object]]:
    """Load the zoo model ``name`` from the cache (training it when absent), re-measure its held-out bits
    per byte on ``ctx.device``, and describe it: training time and tokens/s as measured when it was built,
    its loss curve as a plot."""
    model, tokenizer, meta = load_zoo_model(name)
    model = model.to(ctx.device)
    train_text, val_text = split_text(load_text(meta["corpus"]), meta["recipe"]["val_fraction"])
    val_ids = encode(tokenizer, val_text)
    figures = evaluate_ids(model, val_ids, token_nbytes(tokenizer))
    train_ids = encode(tokenizer, train_text)
    unigram = unigram_loss(train_ids, val_ids[1:], tokenizer.vocab_size)
    unigram_bpb = bits_per_byte(unigram, figures["tokens"], figures["bytes"])
    curve = meta["loss_curve"]
    wiki = meta.get("wikitext2_test", {})
    details: dict[str, object] = {
        "heldout_bits_per_byte": round(figures["bits_per_byte"], 4),
        "heldout_bits_per_byte_at_build": round(meta["heldout_bits_per_byte"], 4),
        "heldout_loss_nats_per_token": round(figures["loss_nats_per_token"], 4),
        "heldout_perplexity": round(figures["perplexity"], 2),
        "heldout_tokens": figures["tokens"],
        "heldout_bytes_per_token": round(figures["bytes_per_token"], 3),
        "unigram_bits_per_byte": round(unigram_bpb, 4),
        "wikitext2_test_bits_per_byte": wiki.get("bits_per_byte", wiki.get("status", "n/a")),
        "train_wall_s (at build)": meta["train_wall_s"],
        "tokens_per_s (at build)": meta["tokens_per_s"],
        "tokens_seen": meta["tokens_seen"],
        "parameters": meta["parameters"],
        "vocab_size": tokenizer.vocab_size,
        "shape": "{n_layer} layers x {n_embd}, {n_head} heads, block {block_size}".format(**meta["model_config"]),
        "dtype": meta["train_config"]["dtype"],
        "corpus": f"{meta['corpus']} (last {meta['recipe']['val_fraction']:.0%} held out)",
        "device": ctx.device,
    }
    plot = Plot(f"Zoo '{name}': loss while training", [float(r["iter"]) for r in curve],
                {"train (estimate)": [r["train_loss"] for r in curve],
                 "held-out (estimate)": [r["val_loss"] for r in curve],
                 "unigram model": [unigram] * len(curve)}, xlabel="iteration", ylabel="loss (nats/token)")
    result = Result(value=figures["bits_per_byte"], unit="bits/byte", details=details, plots=[plot])
    return result, {"unigram_bpb": unigram_bpb}


def zoo_bpe_base(ctx: Context) -> Result:
    """bpe-base's bits per byte on Shakespeare's held-out last 10% (re-measured on load; the model is
    trained into the cache first when absent, ~15 minutes on 2 idle cores)."""
    return _zoo_result("bpe-base", ctx)[0]


def zoo_bpe_small_vs_unigram(ctx: Context) -> Result:
    """bpe-small's held-out bits per byte over a unigram model's on the same tokens (counted on the train
    90%): below 1 means the model uses context. The bits per byte themselves are in the details."""
    result, extra = _zoo_result("bpe-small", ctx)
    bpb = result.value
    result.details = {"bits_per_byte": round(bpb, 4), **result.details}
    result.value = bpb / extra["unigram_bpb"]
    result.unit = "x"
    return result
