"""Project 4 claims: the zoo's ``chat`` model (bpe-base after supervised fine-tuning) answers held-out
instructions; the base model's accuracy, every task's accuracy, training time and tokens/s beside it."""

from __future__ import annotations

import functools
import time
from typing import Any

from harness.measure import Context, Plot, Result
from impl.sft import chat
from impl.sft.evaluate import accuracy
from impl.zoo import load as load_zoo_model


@functools.lru_cache(maxsize=4)
def zoo_accuracy(name: str, device: str = "cpu") -> dict[str, Any]:
    """Held-out exact match of the zoo model ``name`` on the chat recipe's evaluation prompts (computed
    once per bench process: the SFT, LoRA and DPO claims share it)."""
    _, evaluation = chat.task_split()
    model, tokenizer, _ = load_zoo_model(name)
    return accuracy(model.to(device), tokenizer, evaluation)


def chat_accuracy(ctx: Context) -> Result:
    """Exact-match accuracy of ``chat``'s greedy answers on the held-out prompts of its task split
    (fine-tuned into the model cache first when absent, a few minutes), and bpe-base's on the same."""
    _, evaluation = chat.task_split()
    t0 = time.perf_counter()
    before = zoo_accuracy(chat.BASE, ctx.device)
    after = zoo_accuracy("chat", ctx.device)
    eval_s = time.perf_counter() - t0
    meta = load_zoo_model("chat")[2]
    sft = meta["sft"]
    kinds = list(after["per_task"])
    details: dict[str, object] = {
        "exact_match_after_sft": round(after["exact_match"], 4),
        "exact_match_base_model": round(before["exact_match"], 4),
        "held_out_prompts": after["n"],
        **{f"task {k}": f"{before['per_task'][k]:.2f} -> {after['per_task'][k]:.2f}" for k in kinds},
        "sft_steps": sft["steps"],
        "sft_train_wall_s (at build)": sft["wall_s"],
        "sft_tokens_per_s (at build)": sft["tokens_per_s"],
        "sft_tokens (trained / read)": f"{sft['trained_tokens']} / {sft['tokens']}",
        "train_examples": sft["train_examples"],
        "recipe": "bpe-base, {n_tasks} tasks (seed {seed}), {eval_fraction:.0%} of prompts held out".format(
            **meta["recipe"]) + ", SFT: {epochs} epochs, batch {batch_size}, packed rows of {pack}, "
        "lr {learning_rate}, {dtype}".format(**meta["recipe"]["sft"]),
        "eval_s (both models)": round(eval_s, 1),
        "device": ctx.device,
    }
    examples = [f"{r['instruction']} | {r['input']!r}\n  expected {r['output']!r}, chat said {p!r}"
                for r, p in list(zip(evaluation, after["predictions"], strict=True))[:12]]
    plots = [
        Plot("Held-out exact match by task", kinds, {"bpe-base": [before["per_task"][k] for k in kinds],
                                                     "chat (after SFT)": [after["per_task"][k] for k in kinds]},
             ylabel="exact match", kind="bar"),
        Plot("SFT loss", [float(i) for i, _ in sft["losses"]], {"train loss": [v for _, v in sft["losses"]]},
             xlabel="step", ylabel="loss (nats/trained token)"),
    ]
    return Result(value=after["exact_match"], unit="fraction", details=details, plots=plots,
                  text="\n".join(examples))
