"""``python -m impl.sft data|train|eval|chat``: the instruction set, fine-tuning on your JSONL, exact-match
evaluation and a chat with the result.

    python -m impl.sft data --out train.jsonl --eval-out eval.jsonl          # the generated task set
    python -m impl.sft train --data train.jsonl --base bpe-base --out runs/sft [--eval-data eval.jsonl]
    python -m impl.sft train --data train.jsonl --out runs/lora --lora 8     # LoRA (merged into the saved model)
    python -m impl.sft eval --model runs/sft --data eval.jsonl
    python -m impl.sft chat --model chat "Reverse the word: garden"

Data: one JSON object a line, ``{"instruction", "input", "output"}`` or ``{"messages": [{"role", "content"},
...]}``; a bad line is an error naming the file and line (exit code 2). A model is a zoo name (``bpe-base``,
``chat``) or a directory ``train`` wrote (``model.safetensors`` with the tokenizer inside).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from impl import zoo
from impl.sft import tasks
from impl.sft.evaluate import accuracy, answer
from impl.sft.fast import SFTConfig, encode_record, finetune, pad_id


def _data(args: argparse.Namespace) -> int:
    records = tasks.make_tasks(args.n, args.seed)
    train, evaluation = tasks.split(records, args.eval_fraction, args.seed)
    tasks.to_jsonl(train, args.out)
    print(f"wrote {len(train)} training records to {args.out}")
    if args.eval_out:
        tasks.to_jsonl(evaluation, args.eval_out)
        print(f"wrote {len(evaluation)} held-out records to {args.eval_out} (no prompt of them is in training)")
    return 0


def _train(args: argparse.Namespace) -> int:
    records = tasks.read_jsonl(args.data)
    eval_records = tasks.read_jsonl(args.eval_data) if args.eval_data else None
    model, tokenizer, meta = zoo.load_any(args.base)
    model = model.float()
    examples = [encode_record(tokenizer, r, args.template) for r in records]
    if args.qlora and not args.lora:
        raise ValueError("--qlora needs --lora RANK (the adapters trained over the 4-bit base)")
    if args.lora:
        from impl.lora.fast import TARGETS, apply_lora, trainable_parameters
        from impl.lora.nf4 import quantize_model

        if args.qlora:
            quantize_model(model, TARGETS)
        apply_lora(model, TARGETS, rank=args.lora, alpha=2 * args.lora)
        trainable, total = trainable_parameters(model)
        print(f"LoRA rank {args.lora} on {list(TARGETS)}{' over an NF4 base' if args.qlora else ''}: "
              f"{trainable:,} of {total:,} parameters trainable ({trainable / total:.2%})")
    cfg = SFTConfig(epochs=args.epochs, batch_size=args.batch_size, pack=args.pack or None,
                    learning_rate=args.lr, min_lr=args.lr / 10, dtype=args.dtype, seed=args.seed,
                    template=args.template)
    result = finetune(model, examples, cfg, pad=pad_id(tokenizer), progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"base": str(args.base), "data": str(args.data), "examples": len(examples),
                               "config": result.config, "steps": result.steps, "wall_s": round(result.wall_s, 1),
                               "tokens_per_s": round(result.tokens_per_s, 1), "losses": result.losses}
    if eval_records is not None:
        scores = accuracy(model, tokenizer, eval_records, progress=not args.quiet)
        summary |= {"eval_exact_match": scores["exact_match"], "eval_per_task": scores["per_task"]}
        print(f"held-out exact match {scores['exact_match']:.3f} on {scores['n']} records")
    if args.lora:
        from impl.lora.fast import merge_lora, save_adapter

        save_adapter(model, out / "adapter.safetensors")
        print(f"wrote the adapter alone to {out / 'adapter.safetensors'}")
    if not args.qlora:  # a 4-bit base cannot be merged back into full-precision weights: the adapter is the output
        if args.lora:
            merge_lora(model)
        zoo.save_dir(out, model, {**meta, "sft": {k: v for k, v in summary.items() if k != "losses"}})
        print(f"wrote the fine-tuned model to {out / 'model.safetensors'}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{result.steps} steps in {result.wall_s:.1f} s ({result.tokens_per_s:,.0f} tokens/s), "
          f"final loss {result.losses[-1][1]:.4f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    model, tokenizer, _ = zoo.load_any(args.model)
    scores = accuracy(model, tokenizer, tasks.read_jsonl(args.data), max_new_tokens=args.max_new_tokens)
    print(json.dumps({"exact_match": scores["exact_match"], "n": scores["n"], "per_task": scores["per_task"]},
                     indent=1))
    return 0


def _chat(args: argparse.Namespace) -> int:
    model, tokenizer, _ = zoo.load_any(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.message})
    generator = torch.Generator().manual_seed(args.seed)
    print(answer(model, tokenizer, [messages], args.max_new_tokens, temperature=args.temperature,
                 generator=generator)[0])
    return 0


def parser(prog: str = "python -m impl.sft") -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommands data, train, eval, chat)."""
    p = argparse.ArgumentParser(prog=prog, description="Supervised fine-tuning of the project's GPT.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the generated instruction set (checkable answers) as JSONL")
    d.add_argument("--out", required=True, help="JSONL for the training records")
    d.add_argument("--eval-out", help="JSONL for the held-out records (their prompts are not in --out)")
    d.add_argument("--n", type=int, default=5000, help="records in all (default 5000)")
    d.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out (default 0.1)")
    d.add_argument("--seed", type=int, default=0, help="generator and split seed (default 0)")
    t = sub.add_parser("train", help="fine-tune a model on a JSONL of instructions or chats")
    t.add_argument("--data", required=True, help='JSONL: {"instruction","input","output"} or {"messages":[...]}')
    t.add_argument("--base", default="bpe-base", help="zoo name or model directory to start from (default bpe-base)")
    t.add_argument("--out", required=True, help="directory for model.safetensors, summary.json (and adapter)")
    t.add_argument("--eval-data", help="JSONL scored by exact match after training")
    t.add_argument("--template", choices=["chat", "alpaca"], default="chat", help="prompt template (default chat)")
    t.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    t.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (default 32)")
    t.add_argument("--pack", type=int, default=256, help="packed row length in tokens; 0 pads instead (default 256)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="autocast dtype (default bf16)")
    t.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank only")
    t.add_argument("--qlora", action="store_true", help="with --lora: over a frozen NF4 base (saves the adapter)")
    t.add_argument("--seed", type=int, default=0, help="shuffling and dropout seed (default 0)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    e = sub.add_parser("eval", help="exact-match accuracy of greedy answers, per task")
    e.add_argument("--model", required=True, help="zoo name or model directory")
    e.add_argument("--data", required=True, help="JSONL whose last assistant turn / output is the reference")
    e.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    c = sub.add_parser("chat", help="answer one message")
    c.add_argument("message", help="the user's message")
    c.add_argument("--model", default="chat", help="zoo name or model directory (default chat)")
    c.add_argument("--system", help="an optional system turn")
    c.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    c.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m impl.sft") -> int:
    """Run the CLI; returns the exit code (2 with one line on stderr for a bad data file, path or model)."""
    args = parser(prog).parse_args(argv)
    try:
        return {"data": _data, "train": _train, "eval": _eval, "chat": _chat}[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
