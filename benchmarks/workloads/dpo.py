"""Project 6 claims: DPO on the zoo's ``chat`` model with programmatic preference pairs from the SFT
tasks: held-out preference accuracy before / after, what it costs the SFT accuracy, and the reward
margin and KL to the reference over training."""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.workloads.sft import zoo_accuracy
from harness.measure import Context, Plot, Result
from impl.dpo.data import pairs_from_tasks
from impl.dpo.fast import preference_accuracy, train_dpo
from impl.sft import chat
from impl.sft.evaluate import accuracy
from impl.zoo import load as load_zoo_model

TRAIN_PAIRS = 1000  # pairs from the chat recipe's train tasks (prompts the SFT model was trained on)
EVAL_PAIRS = 200    # pairs from its held-out tasks
SETTINGS = {"beta": 0.1, "steps": 120, "lr": 2e-5, "batch_size": 8, "loss_type": "sigmoid", "seed": 0}


@functools.lru_cache(maxsize=1)
def dpo_run(device: str = "cpu") -> dict[str, Any]:
    """Train a copy of ``chat`` with DPO against a frozen ``chat`` (``SETTINGS``), once per bench process;
    measure preference accuracy on the held-out pairs before (the SFT model's likelihood ranking) and
    after (the implicit reward), and the SFT exact match of both models."""
    train_tasks, eval_tasks = chat.task_split()
    train_pairs = pairs_from_tasks(train_tasks[:TRAIN_PAIRS], seed=1)
    eval_pairs = pairs_from_tasks(eval_tasks[:EVAL_PAIRS], seed=2)
    policy, tokenizer, _ = load_zoo_model("chat")
    reference, _, _ = load_zoo_model("chat")
    policy, reference = policy.float().to(device), reference.float().to(device)
    sft_before = zoo_accuracy("chat", device)["exact_match"]  # the SFT claim's figure, computed once
    result = train_dpo(policy, reference, tokenizer, train_pairs, eval_records=eval_pairs, log_every=10,
                       progress=False, **SETTINGS)
    return {
        "before": result.eval_accuracy_before,
        "after": result.eval_accuracy_after,
        "after_likelihood": preference_accuracy(policy, None, tokenizer, eval_pairs),
        "sft_before": sft_before,
        "sft_after": accuracy(policy, tokenizer, eval_tasks)["exact_match"],
        "history": result.history,
        "wall_s": result.wall_s,
        "reference_pairs_computed": result.reference_pairs_computed,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
    }


def _result(value: float, run: dict[str, Any]) -> Result:
    h = run["history"]
    steps = [float(r["step"]) for r in h]
    details = {
        "held-out preference accuracy before (SFT model, likelihood)": round(run["before"], 4),
        "held-out preference accuracy after (implicit reward)": round(run["after"], 4),
        "held-out preference accuracy after (policy likelihood)": round(run["after_likelihood"], 4),
        "SFT exact match before / after": f"{run['sft_before']:.4f} / {run['sft_after']:.4f}",
        "final reward margin": round(h[-1]["reward_margin"], 4),
        "final kl_chosen (log pi - log pi_ref on chosen, nats)": round(h[-1]["kl_chosen"], 4),
        "pairs (train / held-out)": f"{run['train_pairs']} / {run['eval_pairs']}",
        "settings": SETTINGS,
        "train_wall_s": round(run["wall_s"], 1),
        "reference forwards (pairs, cached once each)": run["reference_pairs_computed"],
    }
    plots = [
        Plot("DPO: reward margin and KL to the reference", steps,
             {"reward margin (train)": [r["reward_margin"] for r in h],
              "kl_chosen (train)": [r["kl_chosen"] for r in h]}, xlabel="step", ylabel="nats"),
        Plot("DPO: held-out preference accuracy", steps,
             {"implicit reward": [r["eval_accuracy"] for r in h],
              "policy likelihood": [r["eval_likelihood_accuracy"] for r in h]}, xlabel="step",
             ylabel="accuracy"),
    ]
    return Result(value=value, unit="fraction", details=details, plots=plots)


def preference_win_rate(ctx: Context) -> Result:
    """Held-out preference accuracy of the DPO-trained chat model (implicit reward)."""
    run = dpo_run(ctx.device)
    return _result(run["after"], run)


def sft_accuracy_kept(ctx: Context) -> Result:
    """SFT exact match after DPO minus before (held-out task prompts)."""
    run = dpo_run(ctx.device)
    return _result(run["sft_after"] - run["sft_before"], run)
