"""Workloads for project 18: a student >= 4x smaller than bpe-base, trained from the same seed on the same
batches from scratch (language-model loss) and distilled from bpe-base (alpha * KD + (1 - alpha) * LM at
temperature T, the teacher's logits computed inside each step under no_grad).

One study (cached per process) trains every variant with the shared loop (``impl.train.loop.train``; the
distillation terms ride its ``aux_loss`` seam, see ``impl/distillation/train.py``) and scores each student's
held-out loss on a fixed prefix of the validation split:

- scratch: LM loss only;
- KD from bpe-base (the claim);
- in the details: KD from bpe-draft (a trained model of the student's own shape, bpe-base's tokenizer), KD
  from the mixture of bpe-base and bpe-draft (multi-teacher, equal weights) against the better single
  teacher, and feature distillation (LM + beta * MSE of projected student states to bpe-base's blocks 3 and 6).
Every teacher shares bpe-base's tokenizer (same 4,096 ids): logit KD needs one vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.measure import Context, MeasurementError, Plot, Result, interleaved
from impl.distillation import fast, naive
from impl.distillation.train import distill, student_like
from impl.train.evaluate import full_split_loss
from impl.train.loop import TrainConfig, train


@dataclass(frozen=True)
class Setup:
    steps: int  # optimizer steps of every run (the same batches in every run)
    batch_size: int
    block_size: int
    eval_tokens: int  # held-out tokens scored (a fixed prefix of the validation split)
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term: alpha * KD + (1 - alpha) * LM
    beta: float = 1.0  # weight of the feature term (feature run: LM + beta * MSE)
    learning_rate: float = 3e-3  # bpe-draft's recipe
    seed: int = 1337  # the students' initial weights and the loop's batches


FULL = Setup(steps=120, batch_size=8, block_size=256, eval_tokens=64 * 256)
QUICK = Setup(steps=30, batch_size=4, block_size=128, eval_tokens=32 * 128)
TEACHER, SECOND_TEACHER, STUDENT_SHAPE = "bpe-base", "bpe-draft", "bpe-draft"


def _config(s: Setup) -> TrainConfig:
    # the loop's own evaluations (2 fixed batches, every steps / 5) give the curves; the losses that count
    # are scored below on the held-out prefix
    return TrainConfig(max_iters=s.steps, lr_decay_iters=s.steps, warmup_iters=max(1, s.steps // 10),
                       learning_rate=s.learning_rate, min_lr=s.learning_rate / 10, beta2=0.95,
                       batch_size=s.batch_size, block_size=s.block_size, eval_interval=max(1, s.steps // 5),
                       eval_iters=2, dtype="bf16", seed=s.seed)


def _loss_step_times(s: Setup, vocab: int) -> dict[str, Any]:
    """ms of the KD loss forward + backward on one batch of logits (batch x block positions), naive vs fast."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(s.batch_size, s.block_size, vocab, generator=gen).requires_grad_(True)
    teacher = torch.randn(s.batch_size, s.block_size, vocab, generator=gen)

    def step(impl):
        def run():
            impl.kd_loss(student, teacher, s.temperature).backward()
            student.grad = None
        return run

    t = interleaved({"naive": step(naive), "fast": step(fast)}, rounds=5, min_time_s=0.05)
    ratio, spread = t.ratio("naive", "fast")
    return {"naive_ms": round(1e3 * t.median_s("naive"), 2), "fast_ms": round(1e3 * t.median_s("fast"), 2),
            "speedup": round(ratio, 3), "speedup_iqr": [round(v, 3) for v in spread], "rounds": 5,
            "logits": f"{s.batch_size} x {s.block_size} x {vocab} fp32"}


@functools.lru_cache(maxsize=2)
def distillation_study(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Held-out losses (nats) of every student variant, the loop's curves, wall times, parameter counts."""
    from impl import zoo

    s = QUICK if quick else FULL
    teacher, tokenizer, meta = zoo.load(TEACHER)
    second, _, second_meta = zoo.load(SECOND_TEACHER)
    if second_meta["tokenizer"] != meta["tokenizer"]:
        raise MeasurementError(f"{SECOND_TEACHER}'s tokenizer differs from {TEACHER}'s: no shared vocabulary")
    teacher, second = teacher.float().to(device), second.float().to(device)
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    held_out = val_ids[: s.eval_tokens + 1]
    cfg = _config(s)
    shape = zoo.RECIPES[STUDENT_SHAPE].model.to_dict() | {"block_size": s.block_size}

    def student() -> torch.nn.Module:
        return student_like(shape, s.seed).to(device)

    runs: dict[str, Any] = {
        "scratch": lambda m: train(m, train_ids, val_ids, cfg, progress=False),
        f"KD {TEACHER}": lambda m: distill(m, [teacher], train_ids, val_ids, cfg, s.temperature, s.alpha),
        f"KD {SECOND_TEACHER}": lambda m: distill(m, [second], train_ids, val_ids, cfg, s.temperature, s.alpha),
        f"KD mixture {TEACHER} + {SECOND_TEACHER}": lambda m: distill(m, [teacher, second], train_ids, val_ids,
                                                                      cfg, s.temperature, s.alpha),
        f"feature {TEACHER} (LM + MSE)": lambda m: distill(m, [teacher], train_ids, val_ids, cfg, s.temperature,
                                                           alpha=0.0, beta=s.beta),
    }
    losses, wall, curves = {}, {}, {}
    start = student()
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    for name, run in runs.items():
        model = student()
        if any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items()):
            raise MeasurementError(f"run {name!r} starts from other weights than the scratch student")
        result = run(model)
        losses[name] = full_split_loss(model, held_out)
        wall[name] = round(result.wall_s, 1)
        curves[name] = [(row["iter"], row["val_loss"]) for row in result.history]
    return {"setup": s, "losses": losses, "wall_s": wall, "curves": curves,
            "teacher_loss": full_split_loss(teacher, held_out),
            "second_teacher_loss": full_split_loss(second, held_out),
            "params": {"student": start.num_params(), TEACHER: teacher.num_params(),
                       "student non-embedding": start.num_params(True) - start.wte.weight.numel(),
                       f"{TEACHER} non-embedding": teacher.num_params(True) - teacher.wte.weight.numel()},
            "train_tokens": s.steps * s.batch_size * s.block_size,
            "kd_loss_step": _loss_step_times(s, teacher.config.vocab_size)}


def distilled_vs_scratch(ctx: Context) -> Result:
    """Held-out loss of the student distilled from bpe-base minus the same student trained from scratch on
    the same batches (nats; negative: distillation helped)."""
    st = distillation_study(ctx.quick, ctx.device)
    s, losses, p = st["setup"], st["losses"], st["params"]
    ratio = p[TEACHER] / p["student"]
    if ratio < 4:
        raise MeasurementError(f"the student has {p['student']:,} parameters, {TEACHER} {p[TEACHER]:,}: only "
                               f"{ratio:.2f}x smaller, the claim needs >= 4x")
    kd = f"KD {TEACHER}"
    singles = {k: v for k, v in losses.items() if k in (kd, f"KD {SECOND_TEACHER}")}
    best_single = min(singles, key=singles.get)
    multi = f"KD mixture {TEACHER} + {SECOND_TEACHER}"
    details = {
        "value": f"held-out loss of the student distilled from {TEACHER} minus the scratch student's",
        "student": f"{STUDENT_SHAPE}'s shape (2 layers x 4 heads x 128, bpe-base's 4,096-id tokenizer, block "
                   f"{s.block_size}), fresh weights from seed {s.seed}: the same initial weights in every run",
        "parameters": p,
        "size_ratio_teacher_over_student": round(ratio, 2),
        "non_embedding_size_ratio": round(p[f"{TEACHER} non-embedding"] / p["student non-embedding"], 2),
        "budget": f"every run: {s.steps} AdamW steps x {s.batch_size} x {s.block_size} tokens "
                  f"({st['train_tokens']:,} tokens), the same batches (loop seed {s.seed}), bf16 autocast, "
                  f"lr {s.learning_rate} cosine to a tenth",
        "objective": f"KD runs: alpha * T^2 KL + (1 - alpha) * LM with alpha {s.alpha}, T {s.temperature}; "
                     f"feature run: LM + {s.beta} * MSE(projected LayerNorm'd student blocks 1, 2 -> {TEACHER} "
                     "blocks 3, 6)",
        "held_out": f"first {s.eval_tokens:,} tokens of the validation split, full_split_loss",
        "loss_nats": {k: round(v, 5) for k, v in losses.items()},
        "perplexity": {k: round(float(np.exp(v)), 2) for k, v in losses.items()},
        "teacher_loss_nats (their own block-size windows of the same prefix)": {
            TEACHER: round(st["teacher_loss"], 5), SECOND_TEACHER: round(st["second_teacher_loss"], 5)},
        "multi-teacher - best single teacher": {"best single": best_single,
                                                "delta_nats": round(losses[multi] - losses[best_single], 5)},
        "feature - scratch": round(losses[f"feature {TEACHER} (LM + MSE)"] - losses["scratch"], 5),
        "wall_s": st["wall_s"],
        "kd_loss_fwd_bwd_naive_vs_fast": st["kd_loss_step"],
    }
    plots = [
        Plot(f"Held-out loss of the student ({s.steps} steps x {s.batch_size} x {s.block_size})", list(losses),
             {"loss (nats)": list(losses.values())}, ylabel="nats", kind="bar"),
        Plot("The loop's val loss during training (2 fixed batches)", [it for it, _ in st["curves"]["scratch"]],
             {k: [v for _, v in c] for k, c in st["curves"].items()}, xlabel="step", ylabel="nats"),
    ]
    return Result(value=losses[kd] - losses["scratch"], unit="nats", details=details, plots=plots)
