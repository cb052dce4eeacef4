"""The zoo: named, trained base models (``char``, ``bpe-small``, ``bpe-base``), built once into the
model cache and loaded by every project.

    from impl import zoo
    model, tokenizer, meta = zoo.load("bpe-base")   # trains it first (~15 min here) if not cached
    meta["heldout_bits_per_byte"], tokenizer.special_tokens["<|assistant|>"]

A fine-tuned model is saved as a directory (``save_dir``: ``model.safetensors`` with the same metadata,
the model config and tokenizer inside) and ``load_any`` takes a zoo name or such a directory.

CLI: ``python -m impl.zoo list|build NAME|verify``. Storage (lock, atomic publish, hashes) is
``impl.model_cache``'s; each recipe registers there with a cache key (recipe + corpus + code,
``impl.zoo.recipes.cache_key``), so an entry built by another recipe or other code is rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from impl import model_cache
from impl.data.corpus import load_text, split_text
from impl.data.tokens import CharTokenizer
from impl.gpt.model import GPT
from impl.train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from impl.zoo.catalog import RECIPES, SPECIAL_TOKENS
from impl.zoo.recipes import Recipe, build, cache_key, encode, tokenizer_from_metadata
from impl.zoo.recipes import _tokenizer_meta as tokenizer_metadata  # public name: saving a model needs it

__all__ = ["RECIPES", "SPECIAL_TOKENS", "Recipe", "load", "load_any", "load_dir", "register_recipe", "save_dir",
           "token_splits", "tokenizer_metadata"]


def register_recipe(recipe: Recipe, replace: bool = False, progress: bool = True) -> model_cache.CachedModel:
    """Register ``recipe`` in the model cache under its name, keyed by ``cache_key(recipe)``."""
    return model_cache.register(recipe.name, lambda: build(recipe, progress=progress),
                                description=recipe.description, replace=replace, key=lambda: cache_key(recipe))


def load(name: str) -> tuple[GPT, Any, dict[str, Any]]:
    """``(model, tokenizer, metadata)`` of the zoo model ``name``, from the cache (built first when it
    is absent, stale or corrupt). The tokenizer is an ``impl.bpe.Tokenizer`` (BPE models, with the
    chat special tokens) or a ``CharTokenizer`` (``char``)."""
    model, meta = model_cache.get(name)
    tokenizer: Any = tokenizer_from_metadata(meta)
    if isinstance(tokenizer, CharTokenizer) or tokenizer.vocab_size == meta["model_config"]["vocab_size"]:
        return model, tokenizer, meta
    raise ValueError(f"zoo model {name!r}: tokenizer has {tokenizer.vocab_size} ids, the model "
                     f"{meta['model_config']['vocab_size']}")


def token_splits(tokenizer: Any, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, held-out ids) of the corpus a zoo model was trained on, cut as its build cut it and
    encoded with ``tokenizer`` (uint16): calibration sets come from the first, perplexities from the second."""
    recipe = meta.get("recipe") or {}
    if "corpus" not in recipe or "val_fraction" not in recipe:
        raise ValueError("metadata lacks its recipe's corpus / val_fraction: not a zoo model's metadata")
    train_text, val_text = split_text(load_text(recipe["corpus"]), recipe["val_fraction"])
    return encode(tokenizer, train_text), encode(tokenizer, val_text)


def save_dir(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model`` to ``path/model.safetensors`` (atomically, hashed) with ``meta``, which must hold
    its ``model_config`` and ``tokenizer`` (a zoo model's metadata does); ``load_dir`` reads it back."""
    missing = [k for k in ("model_config", "tokenizer") if k not in meta]
    if missing:
        raise ValueError(f"metadata lacks {missing}: start from a zoo model's metadata")
    meta = {k: v for k, v in meta.items() if k != model_cache.KEY_FIELD} | {"model_config": model.config.to_dict()}
    return save_checkpoint(Path(path) / model_cache.MODEL_FILE, model, meta=meta)


def load_dir(path: str | Path) -> tuple[GPT, Any, dict[str, Any]]:
    """``(model, tokenizer, metadata)`` from a directory written by ``save_dir`` (hash checked), or by
    ``impl.ptq.modules.save_quantized`` (a quantized model)."""
    file = Path(path) / model_cache.MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no {model_cache.MODEL_FILE}: not a saved model directory")
    meta = read_meta(file)
    if "quantization" in meta:  # written by impl.ptq: its layers are rebuilt before the codes load
        from impl.ptq.modules import load_quantized

        return load_quantized(path)
    model = model_cache.gpt_from_metadata(meta)
    load_checkpoint(file, model)
    return model.eval(), tokenizer_from_metadata(meta), meta


def load_any(name_or_path: str | Path) -> tuple[GPT, Any, dict[str, Any]]:
    """A zoo model by name (``load``) or a saved model directory (``load_dir``); an unknown name that is
    no directory either is an error naming both."""
    if Path(name_or_path).is_dir():
        return load_dir(name_or_path)
    name = str(name_or_path)
    if name in model_cache.registered():
        return load(name)
    known = ", ".join(sorted(set(RECIPES) | set(model_cache.registered())))
    raise ValueError(f"{name!r} is neither a model directory nor a known model (known: {known})")


def _build_chat() -> tuple[torch.nn.Module, dict[str, Any]]:
    from impl.sft import chat

    return chat.build()


def _chat_key() -> str:
    from impl.sft import chat

    return chat.cache_key()


for _recipe in RECIPES.values():
    if _recipe.name not in model_cache.registered():
        register_recipe(_recipe)
if "chat" not in model_cache.registered():  # bpe-base fine-tuned on the instruction set (impl/sft/chat.py)
    model_cache.register("chat", _build_chat, description="bpe-base after supervised fine-tuning on the "
                         "project's instruction set (impl/sft)", key=_chat_key)
