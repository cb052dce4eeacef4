"""The zoo's ``chat`` model: ``bpe-base`` fine-tuned on the project's instruction set, built once into the
model cache. The serving, UI, LoRA and DPO projects start from it.

    from impl import zoo
    model, tokenizer, meta = zoo.load("chat")     # fine-tunes bpe-base first when absent (minutes)

Its cache key covers the base model's key, this recipe and the fine-tuning code, so a change to any of
them rebuilds it (never loads a model that other code produced).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from impl.sft import tasks
from impl.sft.fast import SFTConfig, encode_record, finetune, pad_id

BASE = "bpe-base"
CODE_FILES = ("impl/sft/chat.py", "impl/sft/fast.py", "impl/sft/templates.py", "impl/sft/tasks.py")


@dataclass(frozen=True)
class ChatRecipe:
    """How ``chat`` is made: the task set (``tasks.make_tasks(n_tasks, seed)``, split by prompt with
    ``eval_fraction`` held out) and the fine-tuning configuration."""

    n_tasks: int = 20000
    seed: int = 0
    eval_fraction: float = 0.05
    sft: SFTConfig = field(default_factory=SFTConfig)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPE = ChatRecipe()


def task_split(recipe: ChatRecipe = RECIPE) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, eval)`` task records of ``recipe``: the eval prompts never appear in train."""
    return tasks.split(tasks.make_tasks(recipe.n_tasks, recipe.seed), recipe.eval_fraction, recipe.seed)


def cache_key(recipe: ChatRecipe = RECIPE) -> str:
    """sha256 over the base model's cache key, the recipe and the fine-tuning code."""
    from impl.zoo import RECIPES
    from impl.zoo.recipes import cache_key as base_key
    from impl.zoo.recipes import code_sha256

    doc = {"base": base_key(RECIPES[BASE]), "recipe": recipe.as_dict(), "code": code_sha256(CODE_FILES)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def build(recipe: ChatRecipe = RECIPE, progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a fresh copy of ``bpe-base`` on the recipe's train split; metadata carries the base's
    (tokenizer, model config) plus the fine-tuning figures (steps, wall time, tokens/s, loss curve)."""
    from impl import zoo

    model, tokenizer, base_meta = zoo.load(BASE)
    model = model.float()  # fine-tune in fp32 weights under bf16 autocast, as the base was trained
    train, evaluation = task_split(recipe)
    examples = [encode_record(tokenizer, r, recipe.sft.template) for r in train]
    result = finetune(model, examples, recipe.sft, pad=pad_id(tokenizer), progress=progress)
    meta = {k: base_meta[k] for k in ("model_config", "tokenizer", "special_token_ids", "parameters")}
    meta |= {
        "zoo_name": "chat",
        "base": BASE,
        "base_heldout_bits_per_byte": base_meta["heldout_bits_per_byte"],
        "recipe": recipe.as_dict(),
        "sft": {"steps": result.steps, "wall_s": round(result.wall_s, 1), "tokens": result.tokens,
                "trained_tokens": result.trained_tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                "train_examples": len(train), "eval_examples": len(evaluation),
                "losses": [[i, round(v, 4)] for i, v in result.losses]},
    }
    return model, meta
