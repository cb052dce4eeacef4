"""Workloads for project 16: QAT against PTQ (RTN and GPTQ) from the same fp32 model, at 4 and 3 bits.

One study serves both claims (cached per process): bpe-base (quick: bpe-small) in fp32; PTQ of it
(round-to-nearest, and GPTQ calibrated on exactly the windows QAT trains on: the same training tokens);
QAT fine-tuning from it for ``steps`` steps, exported to real integer weights (project 14's QuantLinear)
and evaluated as such; and the control, the same fine-tuning without fake quantization followed by RTN
(does QAT win by being quantization-aware, or by training more?). Losses are on a fixed held-out prefix
of the validation split. The tied embedding / LM head stays fp32 in every variant (block linears only).
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from harness.measure import Context, MeasurementError, Plot, Result, interleaved
from impl.data.tokens import random_batch
from impl.ptq.gptq import gptq_model
from impl.ptq.modules import quantize_model
from impl.ptq.quant import Scheme
from impl.qat.train import TARGETS, convert, fake_quant_modules, prepare_qat, qat_finetune
from impl.train.evaluate import full_split_loss
from impl.train.loop import TrainConfig, train


@dataclass(frozen=True)
class Setup:
    model: str
    group_size: int  # the project-14 scheme: symmetric, per group of the input dimension
    steps: int  # QAT (and control) optimizer steps
    batch_size: int
    block_size: int
    learning_rate: float
    eval_tokens: int  # held-out tokens scored (a fixed prefix of the validation split)
    rtn_bits: tuple[int, ...]  # every width RTN is scored at (8 bits: in the details only)
    plot_bits: tuple[int, ...]  # GPTQ's widths and the plot's x axis, QAT's (CLAIM_BITS) first


FULL = Setup("bpe-base", 128, steps=100, batch_size=8, block_size=256, learning_rate=1e-4, eval_tokens=32768,
             rtn_bits=(8, 4, 3, 2), plot_bits=(4, 3, 2))
QUICK = Setup("bpe-small", 64, steps=20, batch_size=8, block_size=128, learning_rate=1e-4, eval_tokens=16384,
              rtn_bits=(4, 3), plot_bits=(4, 3))
CLAIM_BITS = (4, 3)


def _config(s: Setup) -> TrainConfig:
    # evaluations of the loop itself only at the start and the end, one batch each: the losses that
    # count are scored below on the held-out prefix
    return TrainConfig(max_iters=s.steps, lr_decay_iters=s.steps, warmup_iters=max(1, s.steps // 10),
                       learning_rate=s.learning_rate, min_lr=s.learning_rate / 10, batch_size=s.batch_size,
                       block_size=s.block_size, eval_interval=10**9, eval_iters=1, dtype="bf16")


def _training_windows(train_ids: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """The (steps x batch, block) token windows the shared loop draws with ``cfg.seed``: QAT's training
    inputs, replayed so GPTQ calibrates on exactly the same tokens."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.cat([random_batch(train_ids, cfg.batch_size, cfg.block_size, gen)[0]
                      for _ in range(cfg.max_iters * cfg.grad_accum_steps)])


def _rtn(model: torch.nn.Module, scheme: Scheme) -> torch.nn.Module:
    out = copy.deepcopy(model)
    quantize_model(out, scheme, TARGETS)
    return out


def _gptq(model: torch.nn.Module, calib: torch.Tensor, scheme: Scheme) -> torch.nn.Module:
    out = copy.deepcopy(model)
    quantize_model(out, scheme, TARGETS, weights=gptq_model(model, calib, scheme))
    return out


def _step_times(model: torch.nn.Module, train_ids: np.ndarray, scheme: Scheme, s: Setup) -> dict[str, Any]:
    """Seconds of the fake quantizer alone (every target weight, forward + backward) and of a whole QAT
    forward + backward (batch 4), naive vs fast, interleaved in this process."""
    x, y = random_batch(train_ids, 4, s.block_size, torch.Generator().manual_seed(1))
    out: dict[str, Any] = {}
    models = {}
    for impl in ("naive", "fast"):
        m = copy.deepcopy(model)
        prepare_qat(m, scheme, impl=impl)
        models[impl] = m

    def fake_quant_only(m):
        def run():
            total = sum(f.quantized_weight().sum() for f in fake_quant_modules(m).values())
            total.backward()
        return run

    def qat_step(m):
        def run():
            with torch.autocast("cpu", torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1).float(), y.flatten())
            loss.backward()
            m.zero_grad(set_to_none=True)
        return run

    for label, make, rounds in (("fake_quant_fwd_bwd", fake_quant_only, 9), ("qat_step_fwd_bwd", qat_step, 5)):
        t = interleaved({impl: make(m) for impl, m in models.items()}, rounds=rounds, min_time_s=0.05)
        ratio, spread = t.ratio("naive", "fast")
        out[label] = {"naive_ms": round(1e3 * t.median_s("naive"), 2), "fast_ms": round(1e3 * t.median_s("fast"), 2),
                      "speedup": round(ratio, 3), "speedup_iqr": [round(v, 3) for v in spread], "rounds": rounds}
    return out


@functools.lru_cache(maxsize=2)
def qat_study(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Every loss of the comparison (nats on the held-out prefix), the training costs and the step times."""
    from impl import zoo

    s = QUICK if quick else FULL
    base, tokenizer, meta = zoo.load(s.model)
    base = base.float().to(device)
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    held_out = val_ids[: s.eval_tokens + 1]
    cfg = _config(s)
    calib = _training_windows(train_ids, cfg)

    def loss(m: torch.nn.Module) -> float:
        return full_split_loss(m, held_out)

    scheme = {b: Scheme(b, s.group_size, True) for b in set(s.rtn_bits) | set(s.plot_bits) | set(CLAIM_BITS)}
    losses: dict[str, dict[int, float]] = {"rtn": {}, "gptq": {}, "qat": {}, "control+rtn": {}}
    wall: dict[str, float] = {}
    fp32 = loss(base)
    for b in s.rtn_bits:
        losses["rtn"][b] = loss(_rtn(base, scheme[b]))
    for b in s.plot_bits:
        t0 = time.perf_counter()
        losses["gptq"][b] = loss(_gptq(base, calib, scheme[b]))
        wall[f"gptq int{b} (incl. eval)"] = round(time.perf_counter() - t0, 1)
    agreement = {}
    for b in CLAIM_BITS:
        model = copy.deepcopy(base)
        result = qat_finetune(model, train_ids, val_ids, scheme[b], cfg)
        wall[f"qat int{b}"] = round(result.wall_s, 1)
        probe = torch.from_numpy(held_out[: s.block_size].astype(np.int64))[None].to(device)
        with torch.no_grad():
            fake_logits = model.eval()(probe)
        convert(model)  # real integer weights: what is evaluated
        with torch.no_grad():
            err = (model(probe) - fake_logits).abs().max().item()
        if not err <= 1e-4 * max(1.0, fake_logits.abs().max().item()):
            raise MeasurementError(f"int{b}: the exported model's logits differ from the QAT model's by {err:.3g}")
        agreement[b] = err
        losses["qat"][b] = loss(model)
    control = copy.deepcopy(base)
    result = train(control, train_ids, val_ids, cfg, progress=False)
    wall["control fine-tuning (no fake quant)"] = round(result.wall_s, 1)
    control_fp32 = loss(control)
    for b in CLAIM_BITS:
        losses["control+rtn"][b] = loss(_rtn(control, scheme[b]))
    return {"setup": s, "fp32": fp32, "control_fp32": control_fp32, "losses": losses, "wall_s": wall,
            "export_max_abs_diff": agreement, "train_tokens": int(calib.numel()),
            "step_times": _step_times(base, train_ids, scheme[4], s)}


def _result(ctx: Context, bits: int) -> Result:
    st = qat_study(ctx.quick, ctx.device)
    s, losses = st["setup"], st["losses"]
    ptq = {"RTN": losses["rtn"][bits], "GPTQ": losses["gptq"][bits]}
    best = min(ptq, key=ptq.get)
    ppl = {k: round(float(np.exp(v)), 3) for k, v in {
        "fp32": st["fp32"], f"RTN int{bits}": ptq["RTN"], f"GPTQ int{bits}": ptq["GPTQ"],
        f"QAT int{bits} (exported)": losses["qat"][bits], "fp32 fine-tuned (control)": st["control_fp32"],
        f"control + RTN int{bits}": losses["control+rtn"][bits]}.items()}
    details = {
        "value": f"QAT loss - best PTQ loss ({best}) at int{bits} g{s.group_size} symmetric",
        "model": f"{s.model}, fp32; block linears c_attn/c_proj/c_fc quantized; tied embedding / LM head fp32 "
                 "(not quantized) in every variant",
        "held_out": f"first {s.eval_tokens:,} tokens of the validation split, full_split_loss",
        "loss_nats": {k: round(v, 5) for k, v in {
            "fp32": st["fp32"], "RTN": ptq["RTN"], "GPTQ": ptq["GPTQ"], "QAT": losses["qat"][bits],
            "control fp32 fine-tuned": st["control_fp32"], "control + RTN": losses["control+rtn"][bits]}.items()},
        "perplexity": ppl,
        "QAT - control+RTN (quantization awareness alone)": round(losses["qat"][bits] - losses["control+rtn"][bits], 5),
        "QAT - RTN": round(losses["qat"][bits] - ptq["RTN"], 5),
        "QAT - GPTQ": round(losses["qat"][bits] - ptq["GPTQ"], 5),
        "budget": f"QAT and the control: {s.steps} AdamW steps of {s.batch_size} x {s.block_size} train tokens "
                  f"({st['train_tokens']:,} tokens, forward + backward each, bf16 autocast, lr {s.learning_rate} "
                  "cosine to a tenth); GPTQ calibrates on exactly those windows (same tokens, one forward pass "
                  "per block, no backward); RTN uses no data",
        "wall_s": st["wall_s"],
        "export_max_abs_logit_diff": st["export_max_abs_diff"][bits],
        "step_times_naive_vs_fast": st["step_times"],
    }
    details["RTN loss by bits"] = {b: round(v, 5) for b, v in losses["rtn"].items()}
    details["GPTQ loss by bits"] = {b: round(v, 5) for b, v in losses["gptq"].items()}
    bits_axis = list(s.plot_bits)  # QAT's widths first: a shorter series is drawn over the first x values
    series = {"fp32": [st["fp32"]] * len(bits_axis),
              "RTN": [losses["rtn"][b] for b in bits_axis],
              "GPTQ": [losses["gptq"][b] for b in bits_axis],
              "QAT": [losses["qat"][b] for b in CLAIM_BITS]}
    plot = Plot(f"Held-out perplexity vs bits ({s.model}, g{s.group_size} symmetric)", [str(b) for b in bits_axis],
                {k: [float(np.exp(v)) for v in vals] for k, vals in series.items()}, xlabel="weight bits",
                ylabel="perplexity", logy=2 in bits_axis)  # 2 bits is off the scale of the rest
    return Result(value=losses["qat"][bits] - ptq[best], unit="nats", details=details, plots=[plot])


def qat_vs_ptq_4bit(ctx: Context) -> Result:
    """Held-out loss of 4-bit QAT (exported integer model) minus the better of 4-bit RTN and GPTQ."""
    return _result(ctx, 4)


def qat_vs_ptq_3bit(ctx: Context) -> Result:
    """Held-out loss of 3-bit QAT (exported integer model) minus the better of 3-bit RTN and GPTQ."""
    return _result(ctx, 3)
