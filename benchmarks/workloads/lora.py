"""Workloads for project 5: LoRA's trainable share and a QLoRA step on a LLaMA-7B-shaped GPT."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from typing import Any

from harness.measure import (
    Context,
    MeasurementError,
    NotApplicable,
    Plot,
    Result,
    peak_memory_bytes,
    require_positive,
)
from impl.lora.fast import TARGETS, trainable_count
from impl.lora.qlora import LLAMA_7B_SHAPE, qlora_step_report
from reference.peft_lora import trainable_count as peft_trainable_count

GIB = 2**30
SHARE_RANK = 32  # the documented config: rank 32 (alpha 64) on every linear of every block
QLORA_TARGET = "benchmarks.workloads.lora:qlora_step_setup"


def trainable_share_7b(ctx: Context) -> Result:
    """Trainable / total parameters of LoRA rank 32 on c_attn, c_proj and c_fc of a LLaMA-7B-shaped
    GPT built on the meta device (no weights); PEFT's injection into the same model must count the same."""
    shares, counts = {}, {}
    for rank in (8, 16, 32, 64):
        ours = trainable_count(LLAMA_7B_SHAPE, rank, TARGETS)
        peft = peft_trainable_count(LLAMA_7B_SHAPE, rank, TARGETS)
        if ours != peft:
            raise MeasurementError(f"rank {rank}: our (trainable, total) {ours} differs from PEFT's {peft}")
        counts[rank] = {"trainable": ours[0], "total": ours[1]}
        shares[rank] = ours[0] / ours[1]
    return Result(
        value=shares[SHARE_RANK], unit="",
        details={"config": {"shape": LLAMA_7B_SHAPE, "targets": list(TARGETS), "rank": SHARE_RANK,
                            "alpha": 2 * SHARE_RANK},
                 "counts_by_rank": counts, "share_by_rank": {r: round(s, 5) for r, s in shares.items()},
                 "peft_counts_equal": True},
    )


def qlora_step_setup(report_path: str, device: str = "cpu", seq_len: int = 64):
    """For ``peak_memory_bytes``: a call that builds the 7B-shaped QLoRA model, runs one training step
    and writes the step's report (with the process's absolute resident peak) to ``report_path``."""

    def run() -> None:
        report = qlora_step_report(steps=1, seq_len=seq_len)
        with open("/proc/self/status") as status:
            hwm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        report["process_peak_bytes"] = hwm_kib * 1024  # VmHWM was reset to the baseline before this call
        with open(report_path, "w") as f:
            json.dump(report, f)

    return run


def qlora_7b_step_memory(ctx: Context) -> Result:
    """Peak resident memory (GiB) of a process that builds a LLaMA-7B-shaped GPT in NF4 layer by layer,
    adds rank-8 LoRA and runs one training step (batch 1 x 64 tokens, 8-bit AdamW) on the CPU."""
    if ctx.device != "cpu":
        raise NotApplicable("this claim is about CPU memory (resident set); it is measured on the CPU only")
    fd, report_path = tempfile.mkstemp(suffix=".json", prefix="qlora7b-")
    os.close(fd)
    try:
        above_baseline = peak_memory_bytes(QLORA_TARGET, report_path=report_path, device="cpu", timeout_s=3000)
        with open(report_path) as f:
            report = json.load(f)
    finally:
        os.unlink(report_path)
    peak = require_positive("process peak", report["process_peak_bytes"])
    return Result(
        value=peak / GIB, unit="GiB",
        details={"process_peak_GiB": round(peak / GIB, 3),
                 "peak_above_baseline_GiB_trim": round(above_baseline / GIB, 3),
                 "fp32_weights_GiB": round(report["fp32_weight_bytes"] / GIB, 2),
                 "nf4_weights_GiB": round(report["nf4_weight_bytes"] / GIB, 3),
                 "bf16_and_adapter_params_GiB": round(report["other_param_bytes"] / GIB, 3),
                 "step_s": [round(s, 1) for s in report["step_s"]], "build_s": round(report["build_s"], 1),
                 "loss": report["losses"], "trainable": report["trainable"], "total": report["total"],
                 "rank": report["rank"], "seq_len": report["seq_len"]},
    )


# ---------------------------------------------------------------- LoRA and QLoRA against full fine-tuning


FT_RANK = 2  # on bpe-base (6 x 256) rank 2 on every block linear is 0.84% of the parameters: "~1%"
FT_LR = 5e-3  # adapters start at zero and are few: a larger step than full fine-tuning's 1e-3


@functools.lru_cache(maxsize=2)
def adapter_finetune(quantized: bool, device: str = "cpu") -> dict[str, Any]:
    """bpe-base with rank-``FT_RANK`` LoRA (over an NF4 base when ``quantized``: QLoRA) fine-tuned with
    the chat recipe's data and schedule (learning rate ``FT_LR``), then its held-out exact match."""
    from impl.lora.fast import apply_lora, trainable_parameters
    from impl.lora.nf4 import quantize_model
    from impl.sft import chat
    from impl.sft.evaluate import accuracy
    from impl.sft.fast import encode_record, finetune, pad_id
    from impl.zoo import load as load_zoo_model

    model, tokenizer, _ = load_zoo_model(chat.BASE)
    model = model.float().to(device)
    if quantized:
        quantize_model(model, TARGETS)
    apply_lora(model, TARGETS, rank=FT_RANK, alpha=2 * FT_RANK)
    train, evaluation = chat.task_split()
    examples = [encode_record(tokenizer, r) for r in train]
    cfg = dataclasses.replace(chat.RECIPE.sft, learning_rate=FT_LR, min_lr=FT_LR / 10)
    result = finetune(model, examples, cfg, pad=pad_id(tokenizer), progress=False)
    scores = accuracy(model, tokenizer, evaluation)
    trainable, total = trainable_parameters(model)
    return {"exact_match": scores["exact_match"], "per_task": scores["per_task"], "trainable": trainable,
            "total": total, "wall_s": result.wall_s, "tokens_per_s": result.tokens_per_s, "steps": result.steps}


def _finetune_figures(ctx: Context) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    from benchmarks.workloads.sft import zoo_accuracy
    from impl.sft import chat

    return (zoo_accuracy(chat.BASE, ctx.device), zoo_accuracy("chat", ctx.device),
            adapter_finetune(False, ctx.device), adapter_finetune(True, ctx.device))


def _finetune_details(base, full, lora, qlora) -> tuple[dict[str, Any], list[Plot]]:
    details = {
        "exact_match": {"bpe-base": round(base["exact_match"], 4), "full fine-tuning (chat)":
                        round(full["exact_match"], 4), f"LoRA r={FT_RANK}": round(lora["exact_match"], 4),
                        f"QLoRA r={FT_RANK} (NF4 base)": round(qlora["exact_match"], 4)},
        "trainable share": {"full": 1.0, "LoRA": round(lora["trainable"] / lora["total"], 5),
                            "QLoRA": round(qlora["trainable"] / qlora["total"], 5)},
        "trainable (LoRA)": f"{lora['trainable']:,} of {lora['total']:,}",
        "train_wall_s": {"LoRA": round(lora["wall_s"], 1), "QLoRA": round(qlora["wall_s"], 1)},
        "tokens_per_s": {"LoRA": round(lora["tokens_per_s"], 1), "QLoRA": round(qlora["tokens_per_s"], 1)},
        "config": f"targets {list(TARGETS)}, rank {FT_RANK}, alpha {2 * FT_RANK}, lr {FT_LR}, the chat recipe's "
                  "data, epochs, batch and packing (impl/sft/chat.py)",
        "per task (LoRA)": {k: round(v, 3) for k, v in lora["per_task"].items()},
        "per task (QLoRA)": {k: round(v, 3) for k, v in qlora["per_task"].items()},
    }
    shares = [lora["trainable"] / lora["total"], qlora["trainable"] / qlora["total"], 1.0]
    plot = Plot("Held-out exact match vs trainable share", [f"LoRA {shares[0]:.2%}", f"QLoRA {shares[1]:.2%}",
                                                            "full 100%"],
                {"exact match": [lora["exact_match"], qlora["exact_match"], full["exact_match"]],
                 "bpe-base (no fine-tuning)": [base["exact_match"]] * 3}, ylabel="exact match", kind="bar")
    return details, [plot]


def lora_recovers_full_finetuning(ctx: Context) -> Result:
    """(LoRA's accuracy gain over bpe-base) / (full fine-tuning's gain), on the SFT task's held-out prompts."""
    base, full, lora, qlora = _finetune_figures(ctx)
    gain = full["exact_match"] - base["exact_match"]
    if gain <= 0:
        raise MeasurementError(f"full fine-tuning gained nothing ({base['exact_match']:.3f} -> "
                               f"{full['exact_match']:.3f}): no gain to recover")
    details, plots = _finetune_details(base, full, lora, qlora)
    return Result(value=(lora["exact_match"] - base["exact_match"]) / gain, unit="", details=details, plots=plots)


def qlora_vs_lora(ctx: Context) -> Result:
    """QLoRA's held-out exact match minus LoRA's (same rank, data and schedule; NF4 base)."""
    base, full, lora, qlora = _finetune_figures(ctx)
    details, plots = _finetune_details(base, full, lora, qlora)
    return Result(value=qlora["exact_match"] - lora["exact_match"], unit="", details=details, plots=plots)
