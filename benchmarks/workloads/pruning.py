"""Project 17 claims, measured on ``bpe-base`` (6 layers x 4 heads x 256 wide, vocab 4096, tied embedding /
LM head, ~5.8M parameters). Every loss is ``full_split_loss`` on one fixed held-out prefix of the validation
split (full: the first 64 x 256 tokens, quick: 16 x 256); calibration windows come from the TRAIN split
(``impl.ptq.calibration``); fine-tuning runs the shared loop (``impl.train.loop``) in bf16 autocast.

- structured: per layer, 2 of 4 heads and 35% of the MLP neurons removed by importance (matrices shrunk),
  then a short fine-tune (no mask needed: the removed weights no longer exist); parameters counted on the
  resulting modules. Two claims read the same pruned model: the reduction and the loss rise.
- one-shot unstructured: magnitude (per layer, global) and Wanda at several sparsities, no fine-tuning:
  the perplexity-vs-sparsity plot and the Wanda-vs-magnitude claim at 50%.
- iterative: magnitude to 70% in three cubic-schedule steps with fine-tuning after each, against one-shot
  70% followed by one fine-tune of the same total number of steps.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.measure import Context, MeasurementError, Plot, Result
from impl import zoo
from impl.pruning import structured
from impl.pruning.unstructured import (
    apply_masks,
    cubic_schedule,
    finetune_masked,
    iterative_prune,
    model_masks,
    sparsity_of,
)
from impl.ptq.calibration import calibration_batches
from impl.train.evaluate import full_split_loss
from impl.train.loop import TrainConfig, train

MODEL = "bpe-base"


@dataclass(frozen=True)
class Setup:
    eval_windows: int  # held-out windows of block_size tokens scored
    calib_windows: int  # calibration windows of 256 train tokens (Wanda, structured importance)
    ft_steps: int  # fine-tuning optimizer steps after structured pruning
    iter_steps: int  # fine-tuning steps after one-shot 70%; the iterative run spends the same in 3 parts
    batch_size: int
    block_size: int
    sparsities: tuple[float, ...]  # the one-shot sweep


FULL = Setup(eval_windows=64, calib_windows=64, ft_steps=240, iter_steps=150, batch_size=8, block_size=256,
             sparsities=(0.1, 0.3, 0.5, 0.6, 0.7, 0.8))
QUICK = Setup(eval_windows=16, calib_windows=16, ft_steps=12, iter_steps=12, batch_size=4, block_size=256,
              sparsities=(0.5,))
# structured, in every layer: 2 of 4 heads and 35% of the MLP neurons. Chosen among three mixes that remove about
# a third of the parameters ((0.25, 0.5): 33.7%, (0, 0.65): 35.1%, (0.5, 0.35): 32.3%) by the loss right after
# pruning, before any fine-tuning (+0.57, +1.17, +0.46 nats on 16 x 256 held-out tokens, 2026-12-02)
HEAD_FRACTION, NEURON_FRACTION = 0.5, 0.35
WANDA_SPARSITY = 0.5
ITERATIVE_SPARSITY, ITERATIVE_STEPS = 0.7, 3


def _setup(ctx: Context) -> Setup:
    return QUICK if ctx.quick else FULL


@functools.lru_cache(maxsize=1)
def _base(device: str) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    model, tokenizer, meta = zoo.load(MODEL)
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    return model.float().to(device).eval(), train_ids, val_ids


def _held_out(s: Setup, val_ids: np.ndarray, block: int) -> np.ndarray:
    return val_ids[: s.eval_windows * block + 1]


def _cfg(s: Setup, steps: int) -> TrainConfig:
    # the loop's own evaluations: only at the start and the end, one batch; the losses that count are below
    return TrainConfig(max_iters=steps, lr_decay_iters=steps, warmup_iters=max(1, steps // 10), learning_rate=3e-4,
                       min_lr=3e-5, batch_size=s.batch_size, block_size=s.block_size, eval_interval=10**9,
                       eval_iters=1, dtype="bf16")


def _budget(s: Setup, steps: int) -> str:
    return f"{steps} AdamW steps x {s.batch_size} x {s.block_size} train tokens (bf16 autocast, lr 3e-4 cosine to 3e-5)"


@functools.lru_cache(maxsize=2)
def structured_study(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """The structurally pruned model: counts before / after, losses before, after pruning, after fine-tuning."""
    s = QUICK if quick else FULL
    base, train_ids, val_ids = _base(device)
    held = _held_out(s, val_ids, base.config.block_size)
    calib = calibration_batches(train_ids, s.calib_windows, 256, seed=0)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    keep = structured.select(model, calib, HEAD_FRACTION, NEURON_FRACTION)
    structured.shrink(model, keep)
    prune_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "setup": s, "keep": keep,
        "params": {"before": base.num_params(), "after": model.num_params()},
        "block_linear_params": {"before": structured.block_linear_params(base),
                                "after": structured.block_linear_params(model)},
        "loss": {"base": full_split_loss(base, held), "pruned, not fine-tuned": full_split_loss(model, held)},
        "wall_s": {"importance + shrink": round(prune_s, 1)},
    }
    result = train(model, train_ids, val_ids, _cfg(s, s.ft_steps), progress=False)
    out["wall_s"]["fine-tune"] = round(result.wall_s, 1)
    out["loss"]["pruned + fine-tuned"] = full_split_loss(model, held)
    return out


def _structured_details(st: dict[str, Any]) -> dict[str, Any]:
    s = st["setup"]
    p, b = st["params"], st["block_linear_params"]
    return {
        "params_whole_model": p | {"removed_fraction": round(1 - p["after"] / p["before"], 4)},
        "params_block_linears": b | {"removed_fraction": round(1 - b["after"] / b["before"], 4)},
        "pruned": f"per layer {HEAD_FRACTION:.0%} of the heads and {NEURON_FRACTION:.0%} of the MLP neurons, "
                  "the least important by their output energy on calibration tokens; matrices shrunk",
        "kept_heads_per_layer": st["keep"]["heads"],
        "kept_neurons_per_layer": [len(n) for n in st["keep"]["neurons"]],
        "loss_nats": {k: round(v, 5) for k, v in st["loss"].items()},
        "perplexity": {k: round(math.exp(v), 3) for k, v in st["loss"].items()},
        "loss_rise_after_fine_tuning_nats": round(st["loss"]["pruned + fine-tuned"] - st["loss"]["base"], 5),
        "held_out": f"first {s.eval_windows} x 256 tokens of the validation split",
        "calibration": f"{s.calib_windows} windows of 256 train tokens, seed 0",
        "budget": _budget(s, s.ft_steps),
        "wall_s": st["wall_s"],
    }


def parameter_reduction(ctx: Context) -> Result:
    """1 - parameters(pruned) / parameters(bpe-base), whole model (tied embedding once), counted on the
    shrunk modules; the loss rise of this model is the next claim's figure (and is in the details)."""
    st = structured_study(ctx.quick, ctx.device)
    details = _structured_details(st)
    return Result(value=details["params_whole_model"]["removed_fraction"], unit="", details=details)


def loss_rise_after_finetune(ctx: Context) -> Result:
    """Held-out loss of the structurally pruned and fine-tuned model minus bpe-base's (nats)."""
    st = structured_study(ctx.quick, ctx.device)
    details = _structured_details(st)
    if not ctx.quick:  # the same fine-tuning of the unpruned model: how much of the recovery is only more training
        s = st["setup"]
        base, train_ids, val_ids = _base(ctx.device)
        control = copy.deepcopy(base)
        result = train(control, train_ids, val_ids, _cfg(s, s.ft_steps), progress=False)
        loss = full_split_loss(control, _held_out(s, val_ids, base.config.block_size))
        details["control: unpruned + same fine-tuning"] = {
            "loss_nats": round(loss, 5), "perplexity": round(math.exp(loss), 3), "wall_s": round(result.wall_s, 1),
            "pruned + fine-tuned minus control (nats)": round(st["loss"]["pruned + fine-tuned"] - loss, 5)}
    return Result(value=details["loss_rise_after_fine_tuning_nats"], unit="nats", details=details)


@functools.lru_cache(maxsize=2)
def one_shot_sweep(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Held-out loss of one-shot pruning (no fine-tuning) per method and sparsity, and each mask's sparsity."""
    s = QUICK if quick else FULL
    base, train_ids, val_ids = _base(device)
    held = _held_out(s, val_ids, base.config.block_size)
    calib = calibration_batches(train_ids, s.calib_windows, 256, seed=0)
    sparsities = tuple(sorted(set(s.sparsities) | {WANDA_SPARSITY}))
    losses: dict[str, dict[float, float]] = {}
    masks_at_claim: dict[str, dict] = {}
    t0 = time.perf_counter()
    for method in ("magnitude", "magnitude-global", "wanda"):
        losses[method] = {}
        for sp in sparsities:
            model = copy.deepcopy(base)
            masks = model_masks(model, method, sp, calib)
            apply_masks(model, masks)
            asked = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            if abs(sparsity_of(model) - asked) > 1e-6 or abs(asked - sp) > 0.01:  # Wanda rounds per row
                raise MeasurementError(f"{method} at {sp}: the masks prune {asked:.4f}, the model is "
                                       f"{sparsity_of(model):.4f} sparse")
            losses[method][sp] = full_split_loss(model, held)
            if sp == WANDA_SPARSITY:
                masks_at_claim[method] = masks
    return {"setup": s, "base": full_split_loss(base, held), "losses": losses, "sparsities": sparsities,
            "masks": masks_at_claim, "wall_s": round(time.perf_counter() - t0, 1)}


def wanda_vs_magnitude(ctx: Context) -> Result:
    """ppl(Wanda) / ppl(magnitude, per layer) at 50% unstructured sparsity of the block linears, one-shot."""
    st = one_shot_sweep(ctx.quick, ctx.device)
    losses, sp = st["losses"], WANDA_SPARSITY
    wanda_masks, mag_masks = st["masks"]["wanda"], st["masks"]["magnitude"]
    if all(torch.equal(wanda_masks[n], mag_masks[n]) for n in wanda_masks):
        raise MeasurementError("Wanda's masks equal magnitude's on every layer: the activations were not used")
    ppl = {m: {str(k): round(math.exp(v), 3) for k, v in by.items()} for m, by in losses.items()}
    details = {
        "value": f"perplexity ratio Wanda / magnitude (per layer) at {sp:.0%}",
        "perplexity_by_method_and_sparsity": ppl,
        "base_perplexity": round(math.exp(st["base"]), 3),
        "wanda / magnitude-global": round(math.exp(losses["wanda"][sp] - losses["magnitude-global"][sp]), 4),
        "pruned": "every c_attn / c_proj / c_fc weight of the 6 blocks (the tied embedding / head is not pruned); "
                  "Wanda compares per output row, magnitude per matrix (or over all of them: global)",
        "calibration": f"{st['setup'].calib_windows} windows of 256 train tokens, seed 0, block by block",
        "held_out": f"first {st['setup'].eval_windows} x 256 tokens of the validation split",
        "wall_s (whole sweep)": st["wall_s"],
    }
    x = [f"{v:.0%}" for v in st["sparsities"]]
    plot = Plot(f"Held-out perplexity vs sparsity, one-shot ({MODEL}, no fine-tuning)", x,
                {m: [math.exp(losses[m][v]) for v in st["sparsities"]] for m in losses}
                | {"unpruned": [math.exp(st["base"])] * len(x)},
                xlabel="sparsity of the block linears", ylabel="perplexity", logy=True)
    return Result(value=math.exp(losses["wanda"][sp] - losses["magnitude"][sp]), unit="x", details=details,
                  plots=[plot])


def iterative_vs_one_shot(ctx: Context) -> Result:
    """Held-out loss of iterative magnitude pruning to 70% (three steps, fine-tuning after each) minus
    one-shot 70% followed by one fine-tune of the same total steps (nats)."""
    s = _setup(ctx)
    base, train_ids, val_ids = _base(ctx.device)
    held = _held_out(s, val_ids, base.config.block_size)
    one_shot = copy.deepcopy(base)
    masks = model_masks(one_shot, "magnitude", ITERATIVE_SPARSITY)
    apply_masks(one_shot, masks)
    loss_pruned = full_split_loss(one_shot, held)
    r = finetune_masked(one_shot, masks, train_ids, val_ids, _cfg(s, s.iter_steps))
    loss_one_shot = full_split_loss(one_shot, held)
    iterative = copy.deepcopy(base)
    rows = iterative_prune(iterative, "magnitude", ITERATIVE_SPARSITY, ITERATIVE_STEPS, train_ids, val_ids,
                           _cfg(s, s.iter_steps // ITERATIVE_STEPS))
    loss_iterative = full_split_loss(iterative, held)
    for name, m in (("one-shot", one_shot), ("iterative", iterative)):
        if abs(sparsity_of(m) - ITERATIVE_SPARSITY) > 1e-3:
            raise MeasurementError(f"{name} ended {sparsity_of(m):.4f} sparse, not {ITERATIVE_SPARSITY}")
    details = {
        "loss_nats": {"base": round(full_split_loss(base, held), 5),
                      "one-shot 70%, no fine-tuning": round(loss_pruned, 5),
                      "one-shot + fine-tune": round(loss_one_shot, 5), "iterative": round(loss_iterative, 5)},
        "schedule (sparsity after each step)": [round(v, 4) for v in cubic_schedule(ITERATIVE_SPARSITY,
                                                                                    ITERATIVE_STEPS)],
        "budget": f"one-shot: {_budget(s, s.iter_steps)}; iterative: {ITERATIVE_STEPS} x "
                  f"{_budget(s, s.iter_steps // ITERATIVE_STEPS)}",
        "wall_s": {"one-shot fine-tune": round(r.wall_s, 1),
                   "iterative fine-tunes": [round(row["train_wall_s"], 1) for row in rows]},
        "pruned": "magnitude per layer, every block linear; the tied embedding / head is not pruned",
        "held_out": f"first {s.eval_windows} x 256 tokens of the validation split",
    }
    return Result(value=loss_iterative - loss_one_shot, unit="nats", details=details)
