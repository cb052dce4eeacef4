"""Project 21 claims: "more parameters, same compute".

- FLOPs and parameters: two MoE GPTs of bpe-base's shape (6 x 4 x 256, vocab 4096, block 256), 16 and 4 top-1
  experts of GPT-2's MLP shape per layer, capacity factor 1.25; FLOPs of one forward counted by
  ``torch.utils.flop_counter.FlopCounterMode`` per token, parameters of the whole model.
- Quality: a 4 x 128 dense GPT against the same GPT with MoE FFNs (8 top-1 experts of the dense MLP's shape:
  equal active parameters), from scratch on bpe-base's tokens, same seed / batches / steps / lr; held-out loss
  of both, tokens/s of both, the loss curves and the experts' load.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import impl.moe  # noqa: F401  (resolves the moe:... FFN names)
from harness.measure import Context, MeasurementError, Plot, Result
from impl import zoo
from impl.gpt.model import GPT, GPTConfig
from impl.moe.layer import MoE
from impl.train.evaluate import full_split_loss
from impl.train.loop import TrainConfig, train

BIG = dict(vocab_size=4096, block_size=256, n_layer=6, n_head=4, n_embd=256)  # bpe-base's shape
FEW, MANY = "moe:e4:k1:c1.25", "moe:e16:k1:c1.25"
SMALL = dict(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128)
SMALL_MOE = "moe:e8:k1:c1.25"


@dataclass(frozen=True)
class Setup:
    flop_batch: int  # sequences of 256 tokens in the FLOP-counted forward
    steps: int
    batch_size: int
    eval_windows: int  # held-out windows of 128 tokens
    eval_interval: int


FULL = Setup(flop_batch=8, steps=250, batch_size=16, eval_windows=64, eval_interval=25)
QUICK = Setup(flop_batch=2, steps=20, batch_size=8, eval_windows=16, eval_interval=10)


def _setup(ctx: Context) -> Setup:
    return QUICK if ctx.quick else FULL


def _gpt(shape: dict[str, int], ffn: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**shape, ffn=ffn))


def expert_params(model: GPT) -> int:
    """Parameters of the experts (all MoE layers), routers excluded."""
    return sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in (m.w_fc, m.b_fc, m.w_proj, m.b_proj))


def forward_flops(model: GPT, idx: torch.Tensor) -> int:
    """FLOPs of one forward of ``model`` on ``idx`` counted by torch's ``FlopCounterMode``."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(idx)
    return counter.get_total_flops()


@functools.lru_cache(maxsize=2)
def compute_study(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """FLOPs per token and parameters of the 4-, 16-expert MoE GPTs and of the dense GPT of the same shape."""
    s = QUICK if quick else FULL
    idx = torch.randint(0, BIG["vocab_size"], (s.flop_batch, BIG["block_size"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    out: dict[str, Any] = {"tokens": idx.numel()}
    for label, ffn in (("dense", "mlp"), ("4 experts", FEW), ("16 experts", MANY)):
        model = _gpt(BIG, ffn).to(device)
        out[label] = {"ffn": ffn, "flops_per_token": forward_flops(model, idx) / idx.numel(),
                      "params": model.num_params(), "expert_params": expert_params(model)}
    return out


def flops_ratio(ctx: Context) -> Result:
    """Forward FLOPs per token of the 16-expert MoE GPT / the 4-expert one (same top-1, same shape)."""
    st = compute_study(ctx.quick, ctx.device)
    few, many = st["4 experts"]["flops_per_token"], st["16 experts"]["flops_per_token"]
    if few <= 0 or many <= 0:
        raise MeasurementError(f"FlopCounterMode counted nothing: {few}, {many}")
    return Result(value=round(many / few, 5), unit="x", details=_compute_details(st))


def params_ratio(ctx: Context) -> Result:
    """Parameters of the 16-expert MoE GPT / the 4-expert one (whole model)."""
    st = compute_study(ctx.quick, ctx.device)
    return Result(value=round(st["16 experts"]["params"] / st["4 experts"]["params"], 5), unit="x",
                  details=_compute_details(st))


def _compute_details(st: dict[str, Any]) -> dict[str, Any]:
    few, many, dense = st["4 experts"], st["16 experts"], st["dense"]
    return {
        "model": "bpe-base's shape: vocab 4096, 6 layers x 4 heads x 256 wide, block 256; experts: GPT-2 MLP "
                 "(256 -> 1024 -> 256, GELU tanh), top-1, capacity factor 1.25",
        "flops_per_token": {k: round(st[k]["flops_per_token"]) for k in ("dense", "4 experts", "16 experts")},
        "params": {k: st[k]["params"] for k in ("dense", "4 experts", "16 experts")},
        "flops_ratio_16_over_4": round(many["flops_per_token"] / few["flops_per_token"], 5),
        "params_ratio_16_over_4_whole_model": round(many["params"] / few["params"], 5),
        "params_ratio_16_over_4_experts_only": round(many["expert_params"] / few["expert_params"], 5),
        "moe4_flops_over_dense": round(few["flops_per_token"] / dense["flops_per_token"], 5),
        "tokens_counted": st["tokens"],
        "counter": "torch.utils.flop_counter.FlopCounterMode, one forward, no_grad",
    }


# ------------------------------------------------------------------ MoE vs dense


def _train_one(ffn: str, s: Setup, train_ids: np.ndarray, val_ids: np.ndarray, device: str) -> dict[str, Any]:
    model = _gpt(SMALL, ffn).to(device)
    cfg = TrainConfig(max_iters=s.steps, lr_decay_iters=s.steps, warmup_iters=max(1, s.steps // 10),
                      learning_rate=2e-3, min_lr=2e-4, batch_size=s.batch_size, block_size=SMALL["block_size"],
                      eval_interval=s.eval_interval, eval_iters=4, dtype="fp32", seed=1337)
    t0 = time.perf_counter()
    result = train(model, train_ids, val_ids, cfg, progress=False)
    wall = time.perf_counter() - t0
    held = val_ids[: s.eval_windows * SMALL["block_size"] + 1]
    loss = full_split_loss(model, held)
    load = [m.last_load.tolist() for m in model.modules() if isinstance(m, MoE)]  # of the last held-out batch
    return {"loss": loss, "params": model.num_params(), "tokens_per_s": result.tokens_per_s, "wall_s": wall,
            "curve": [(row["iter"], row["val_loss"]) for row in result.history], "load": load}


@functools.lru_cache(maxsize=2)
def quality_study(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Train the dense and the MoE GPT the same way; their held-out losses, speeds, curves, expert loads."""
    s = QUICK if quick else FULL
    _, tokenizer, meta = zoo.load("bpe-base")
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    return {"setup": s, "dense": _train_one("mlp", s, train_ids, val_ids, device),
            "moe": _train_one(SMALL_MOE, s, train_ids, val_ids, device)}


def moe_vs_dense(ctx: Context) -> Result:
    """Held-out loss of the MoE GPT minus the dense GPT's (nats), equal active parameters and steps."""
    st = quality_study(ctx.quick, ctx.device)
    s, dense, moe = st["setup"], st["dense"], st["moe"]
    delta = moe["loss"] - dense["loss"]
    if not math.isfinite(delta):
        raise MeasurementError(f"non-finite losses: dense {dense['loss']}, moe {moe['loss']}")
    details = {
        "val_loss_nats": {"dense": round(dense["loss"], 5), "moe": round(moe["loss"], 5)},
        "perplexity": {"dense": round(math.exp(dense["loss"]), 3), "moe": round(math.exp(moe["loss"]), 3)},
        "params": {"dense": dense["params"], "moe": moe["params"]},
        "active_ffn": "dense: one MLP 128 -> 512 -> 128 per layer; MoE: 8 experts of that shape, each token runs 1",
        "train_tokens_per_s": {"dense": round(dense["tokens_per_s"]), "moe": round(moe["tokens_per_s"])},
        "moe_over_dense_tokens_per_s": round(moe["tokens_per_s"] / dense["tokens_per_s"], 4),
        "wall_s": {"dense": round(dense["wall_s"], 1), "moe": round(moe["wall_s"], 1)},
        "expert_load_last_eval_batch": {f"layer {i}": row for i, row in enumerate(moe["load"])},
        "budget": f"{s.steps} AdamW steps x {s.batch_size} x 128 train tokens each, lr 2e-3 cosine to 2e-4, fp32, "
                  "seed 1337 (same batches for both)",
        "held_out": f"first {s.eval_windows} x 128 tokens of the validation split",
        "timing_note": "tokens/s on a shared 2-core CPU: noisy, one run",
    }
    plots = [
        Plot(title="val loss vs step (4 eval batches of the loop)", x=[it for it, _ in dense["curve"]],
             series={"dense": [v for _, v in dense["curve"]], "MoE 8 x top-1": [v for _, v in moe["curve"]]},
             xlabel="step", ylabel="val loss (nats)"),
        Plot(title="tokens kept per expert (MoE, last held-out batch), by layer",
             x=[f"expert {e}" for e in range(len(moe["load"][0]))],
             series={f"layer {i}": [float(v) for v in row] for i, row in enumerate(moe["load"])},
             xlabel="expert", ylabel="tokens", kind="bar"),
    ]
    return Result(value=round(delta, 5), unit="nats", details=details, plots=plots)
