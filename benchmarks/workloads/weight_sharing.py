"""Workloads for project 19: what tying saves at GPT-2 scale, and what cross-layer sharing costs in quality.

``tying_reduction``: 1 - tied / untied parameters of GPT-2 small, counted three ways that must agree
(our GPT built on the meta device, the closed form of ``impl.weight_sharing.counts``, HF transformers'
``GPT2LMHeadModel``), plus the same fraction at other shapes in the details.

``albert_sharing_loss``: one small GPT shape trained from scratch four ways at the same budget
(iterations x batch x block, same seed, same batches): unshared, two groups of two layers, all layers
shared (ALBERT), and unshared with a factorized embedding; every loss on the same fixed held-out prefix.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.measure import Context, MeasurementError, Plot, Result
from impl.train.evaluate import full_split_loss
from impl.train.loop import TrainConfig, train
from impl.weight_sharing.counts import build, counted_params, param_count
from impl.weight_sharing.sharing import layer_groups, sharing_groups
from reference.hf_gpt2_config import param_count as hf_param_count

GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
OTHER_SHAPES = {
    "gpt2-medium (24 x 1024)": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large (36 x 1280)": dict(vocab_size=50257, block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    "our 125M (12 x 896, 10K vocab)": dict(vocab_size=10_000, block_size=1024, n_layer=12, n_head=14, n_embd=896),
    "bpe-base shape (6 x 256, 4K vocab, biases on)": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=4,
                                                          n_embd=256),
}


def _counts(shape: dict[str, int], tied: bool) -> int:
    """One count that three independent routes agree on, or a MeasurementError naming all three."""
    ours, formula, hf = counted_params(**shape, tied=tied), param_count(**shape, tied=tied), \
        hf_param_count(**shape, tied=tied)
    if not ours == formula == hf:
        raise MeasurementError(f"{shape} tied={tied}: counted {ours:,}, closed form {formula:,}, HF {hf:,} differ")
    return ours


def tying_reduction(ctx: Context) -> Result:
    """1 - tied / untied parameters of GPT-2 small (our GPT == closed form == HF, each side)."""
    tied, untied = _counts(GPT2_SMALL, True), _counts(GPT2_SMALL, False)
    others = {}
    for name, shape in OTHER_SHAPES.items():
        t, u = _counts(shape, True), _counts(shape, False)
        others[name] = {"tied": t, "untied": u, "reduction": round(1 - t / u, 4)}
    details = {
        "value": "1 - tied / untied parameters, GPT-2 small (vocab 50,257, 1,024 positions, 12 x 768)",
        "gpt2_small_tied": tied, "gpt2_small_untied": untied, "saved": untied - tied,
        "counted_by": "our GPT on the meta device == impl.weight_sharing.counts closed form == HF "
                      "GPT2LMHeadModel(tie_word_embeddings=True/False).num_parameters(), for every shape",
        "other_shapes": others,
    }
    labels = ["gpt2-small"] + list(others)
    fractions = [1 - tied / untied] + [v["reduction"] for v in others.values()]
    plot = Plot("Parameters saved by tying the embedding and the LM head", labels,
                {"reduction": fractions}, xlabel=" | ".join(labels), ylabel="fraction of the untied model",
                kind="bar")
    return Result(value=1 - tied / untied, unit="fraction", details=details, plots=[plot])


@dataclass(frozen=True)
class Setup:
    iters: int
    batch_size: int
    eval_tokens: int  # a fixed prefix of the held-out split, scored in full
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    embed_dim: int = 32  # the factorized variant's E
    learning_rate: float = 3e-3


FULL = Setup(iters=500, batch_size=16, eval_tokens=128 * 128)
QUICK = Setup(iters=100, batch_size=8, eval_tokens=64 * 128)


def _variants(s: Setup) -> dict[str, dict[str, Any]]:
    return {
        "unshared": {},
        "grouped (2 groups)": {"layer_groups": layer_groups(s.n_layer, 2)},
        "all-shared (ALBERT)": {"layer_groups": layer_groups(s.n_layer, 1)},
        f"factorized E={s.embed_dim}": {"embed_dim": s.embed_dim},
    }


def _config(s: Setup) -> TrainConfig:
    # the loop's own evaluations only at the start and the end, one batch each: the losses that count are
    # scored below on the held-out prefix
    return TrainConfig(max_iters=s.iters, lr_decay_iters=s.iters, warmup_iters=max(1, s.iters // 20),
                       learning_rate=s.learning_rate, min_lr=s.learning_rate / 10, beta2=0.95,
                       batch_size=s.batch_size, block_size=s.block_size, eval_interval=10**9, eval_iters=1,
                       dtype="bf16")


@functools.lru_cache(maxsize=2)
def sharing_study(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Held-out loss, parameters and training time of every variant, trained from scratch alike."""
    from impl import zoo

    s = QUICK if quick else FULL
    _, tokenizer, meta = zoo.load("bpe-small")  # its 2,048-id tokenizer and corpus split; its weights unused
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    held_out = val_ids[: s.eval_tokens + 1]
    shape = dict(vocab_size=tokenizer.vocab_size, block_size=s.block_size, n_layer=s.n_layer, n_head=s.n_head,
                 n_embd=s.n_embd)
    cfg = _config(s)
    rows: dict[str, dict[str, Any]] = {}
    for name, variant in _variants(s).items():
        torch.manual_seed(0)  # the same initial weights for every variant (a shared group keeps its first's)
        model = build(**shape, **variant).to(device)
        n = model.num_params()
        if n != param_count(**shape, **variant):
            raise MeasurementError(f"{name}: the model has {n:,} parameters, the closed form says "
                                   f"{param_count(**shape, **variant):,}")
        groups = sharing_groups(model)
        result = train(model, train_ids, val_ids, cfg, progress=False)
        loss = full_split_loss(model, held_out)
        if not np.isfinite(loss):
            raise MeasurementError(f"{name}: held-out loss is {loss}")
        embedding = sum(p.numel() for p in model.wte.parameters()) + model.wpe.weight.numel()
        rows[name] = {"params": n, "non_embedding_params": n - embedding,
                      "distinct_layer_weight_sets": len(groups), "held_out_loss": loss,
                      "perplexity": float(np.exp(loss)), "train_wall_s": round(result.wall_s, 1),
                      "tokens_per_s": round(result.tokens_per_s)}
    return {"setup": s, "shape": shape, "rows": rows, "train_tokens": s.iters * s.batch_size * s.block_size}


def albert_sharing_loss(ctx: Context) -> Result:
    """Held-out loss of the all-shared (ALBERT) model minus the unshared model's, same budget (nats)."""
    t0 = time.perf_counter()
    st = sharing_study(ctx.quick, ctx.device)
    s, rows = st["setup"], st["rows"]
    base, shared = rows["unshared"], rows["all-shared (ALBERT)"]
    table = {name: {"params": r["params"], "params_vs_unshared": round(r["params"] / base["params"], 4),
                    "held_out_loss": round(r["held_out_loss"], 4), "loss_rise": round(r["held_out_loss"]
                                                                                        - base["held_out_loss"], 4),
                    "perplexity": round(r["perplexity"], 2), "distinct_layer_weight_sets":
                    r["distinct_layer_weight_sets"], "train_wall_s": r["train_wall_s"]}
             for name, r in rows.items()}
    details = {
        "value": "held-out loss (nats) of all-shared minus unshared, same budget and seed",
        "model": f"{s.n_layer} layers x {s.n_embd} wide, {s.n_head} heads, block {s.block_size}, biases on, tied "
                 f"head, bpe-small's {st['shape']['vocab_size']:,}-id tokenizer and corpus, trained from scratch",
        "budget": f"{s.iters} AdamW steps x batch {s.batch_size} x block {s.block_size} = {st['train_tokens']:,} "
                  f"tokens per variant, lr {s.learning_rate} cosine to a tenth, bf16 autocast, seed 1337 batches",
        "held_out": f"first {s.eval_tokens:,} tokens of the validation split, full_split_loss",
        "parameter_reduction_all_shared": round(1 - shared["params"] / base["params"], 4),
        "parameter_efficiency_table": table,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    order = sorted(rows, key=lambda k: rows[k]["params"])
    plot = Plot(f"Held-out loss vs parameters (same {st['train_tokens']:,} training tokens)",
                [rows[k]["params"] for k in order], {"variants, smallest first": [rows[k]["held_out_loss"]
                                                                                  for k in order]},
                xlabel="parameters: " + ", ".join(order), ylabel="held-out loss (nats)")
    return Result(value=shared["held_out_loss"] - base["held_out_loss"], unit="nats", details=details, plots=[plot])
