"""``python -m impl.dpo pairs|train|eval``: programmatic preference pairs, DPO training, preference accuracy.

    python -m impl.dpo pairs --out prefs.jsonl --n 2000
    python -m impl.dpo train --data prefs.jsonl --model bpe-base --out runs/dpo --steps 200
    python -m impl.dpo eval --data held_out.jsonl --model runs/dpo --reference bpe-base

A model is a zoo name (``impl.zoo.load``) or a directory ``train`` wrote: ``model.safetensors`` in
``impl.train.checkpoint``'s format (weights + hash-checked metadata holding ``model_config`` and the
zoo's ``tokenizer`` entry), plus ``history.json`` and ``dpo_training.png`` (reward margin and KL over training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from impl import zoo
from impl.dpo.data import pairs_from_tasks, read_preferences, write_preferences
from impl.dpo.fast import LOSS_TYPES, DPOResult, preference_accuracy, train_dpo
from impl.gpt.model import GPT
from impl.model_cache import MODEL_FILE
from impl.sft.tasks import make_tasks


def load_model(name_or_path: str) -> tuple[GPT, Any, dict[str, Any]]:
    """``(model, tokenizer, metadata)`` from a zoo name or a saved model directory (``impl.zoo.load_any``),
    in float32 (DPO's small log-ratio differences need it) and eval mode."""
    model, tokenizer, meta = zoo.load_any(name_or_path)
    return model.float().eval(), tokenizer, meta


def save_model(out: Path, model: GPT, meta: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Write ``out/model.safetensors`` (``impl.zoo.save_dir``) with the base's metadata and ``extra``."""
    return zoo.save_dir(out, model, {**meta, **extra})


def plot_history(result: DPOResult, path: Path) -> Path:
    """Reward margin and KL (kl_chosen) against the step, two panels, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in result.history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(steps, [row["reward_margin"] for row in result.history], marker="o")
    left.set(xlabel="step", ylabel="reward margin (nats x beta)", title="chosen - rejected reward")
    right.plot(steps, [row["kl_chosen"] for row in result.history], marker="o", color="C1")
    right.set(xlabel="step", ylabel="nats", title="log pi - log pi_ref on chosen (KL estimate)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pairs(args: argparse.Namespace) -> int:
    records = pairs_from_tasks(make_tasks(args.n, seed=args.seed), seed=args.seed)
    write_preferences(records, args.out)
    print(f"wrote {len(records)} preference pairs to {args.out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    records = read_preferences(args.data)
    eval_records = read_preferences(args.eval_data) if args.eval_data else None
    policy, tokenizer, meta = load_model(args.model)
    reference, _, _ = load_model(args.model)
    result = train_dpo(policy, reference, tokenizer, records, beta=args.beta, steps=args.steps, lr=args.lr,
                       batch_size=args.batch_size, eval_records=eval_records, log_every=args.log_every,
                       loss_type=args.loss, seed=args.seed, progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"base": args.model, "beta": args.beta, "steps": args.steps, "lr": args.lr,
                "batch_size": args.batch_size, "loss_type": args.loss, "seed": args.seed, "pairs": len(records)}
    save_model(out, policy, meta, {"dpo": settings})
    summary = {"settings": settings, "history": result.history, "wall_s": result.wall_s,
               "reference_pairs_computed": result.reference_pairs_computed,
               "eval_accuracy_before": result.eval_accuracy_before, "eval_accuracy_after": result.eval_accuracy_after}
    (out / "history.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_history(result, out / "dpo_training.png")
    last = result.history[-1]
    print(f"trained {args.steps} steps in {result.wall_s:.1f}s: loss {last['loss']:.4f}, reward accuracy "
          f"{last['reward_accuracy']:.3f}, margin {last['reward_margin']:.4f}; wrote {out / MODEL_FILE}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    records = read_preferences(args.data)
    policy, tokenizer, _ = load_model(args.model)
    reference, _, _ = load_model(args.reference)
    accuracy = preference_accuracy(policy, reference, tokenizer, records, beta=args.beta)
    print(json.dumps({"preference_accuracy": accuracy, "pairs": len(records)}))
    return 0


def parser(prog: str = "python -m impl.dpo") -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommands pairs, train, eval)."""
    p = argparse.ArgumentParser(prog=prog, description="Direct Preference Optimization on the project's GPT.")
    sub = p.add_subparsers(dest="command", required=True)
    pairs = sub.add_parser("pairs", help="write programmatic preference pairs from the SFT tasks")
    pairs.add_argument("--out", required=True, help="JSONL file to write ({prompt, chosen, rejected, task})")
    pairs.add_argument("--n", type=int, default=2000, help="number of pairs (default 2000)")
    pairs.add_argument("--seed", type=int, default=0, help="task and wrong-answer seed (default 0)")
    train = sub.add_parser("train", help="train a policy with DPO against a frozen copy of the starting model")
    train.add_argument("--data", required=True, help="preference JSONL ({prompt, chosen, rejected} a line)")
    train.add_argument("--model", required=True, help="zoo name (e.g. bpe-base) or a directory written by train")
    train.add_argument("--out", required=True, help="directory for model.safetensors, history.json, the plot")
    train.add_argument("--eval-data", help="held-out preference JSONL scored at every log step")
    train.add_argument("--beta", type=float, default=0.1, help="KL strength beta (default 0.1)")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    train.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    train.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid", help="sigmoid (DPO) or ipo")
    train.add_argument("--log-every", type=int, default=10, help="steps per history row (default 10)")
    train.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="preference accuracy: share of pairs whose implicit reward prefers chosen")
    ev.add_argument("--data", required=True, help="preference JSONL")
    ev.add_argument("--model", required=True, help="the policy: zoo name or directory")
    ev.add_argument("--reference", required=True, help="the reference it was trained against")
    ev.add_argument("--beta", type=float, default=0.1, help="beta (the sign of the margin does not depend on it)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m impl.dpo") -> int:
    """Run the CLI; returns the exit code (2 on a bad data file or model path, with one line on stderr)."""
    args = parser(prog).parse_args(argv)
    try:
        return {"pairs": _pairs, "train": _train, "eval": _eval}[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # a bad data file, path or zoo name
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
