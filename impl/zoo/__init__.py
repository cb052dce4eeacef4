"""The zoo: named, trained base models (``char``, ``bpe-small``, ``bpe-base``), built once into the
model cache and loaded by every project.

    from impl import zoo
    model, tokenizer, meta = zoo.load("bpe-base")   # trains it first (~15 min here) if not cached
    meta["heldout_bits_per_byte"], tokenizer.special_tokens["<|assistant|>"]

CLI: ``python -m impl.zoo list|build NAME|verify``. Storage (lock, atomic publish, hashes) is
``impl.model_cache``'s; each recipe registers there with a cache key (recipe + corpus + code,
``impl.zoo.recipes.cache_key``), so an entry built by another recipe or other code is rebuilt.
"""

from __future__ import annotations

from typing import Any

from impl import model_cache
from impl.data.tokens import CharTokenizer
from impl.gpt.model import GPT
from impl.zoo.catalog import RECIPES, SPECIAL_TOKENS
from impl.zoo.recipes import Recipe, build, cache_key, tokenizer_from_metadata

__all__ = ["RECIPES", "SPECIAL_TOKENS", "Recipe", "load", "register_recipe"]


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


for _recipe in RECIPES.values():
    if _recipe.name not in model_cache.registered():
        register_recipe(_recipe)
