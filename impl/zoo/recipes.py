"""The code that trains the zoo's recipes, and the cache key (what it hashes).

A recipe is plain data: corpus, tokenizer settings, model shape, training config (the named ones
are in ``catalog.py``). ``build(recipe)`` trains it deterministically (seeded) and returns
``(model, metadata)`` for ``impl.model_cache``; ``cache_key(recipe)`` hashes the recipe's data,
the corpus's sha256 and the source of every file that trains it (this one included, the catalog
not: its recipes are hashed as data), so an entry built from another recipe or other code is
stale, never silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from impl.bpe.tokenizer import Tokenizer
from impl.bpe.tokenizer import train as train_bpe
from impl.data.corpus import load_text, split_text
from impl.data.tokens import CharTokenizer
from impl.gpt.model import GPT, GPTConfig
from impl.train.evaluate import evaluate_ids
from impl.train.loop import TrainConfig, TrainResult, train

ROOT = Path(__file__).resolve().parents[2]  # the checkout

# Source files whose change changes what a build produces (the zoo's CLI and README are not among them).
CODE_FILES = (
    "impl/zoo/recipes.py",
    "impl/train/loop.py",
    "impl/train/evaluate.py",
    "impl/train/checkpoint.py",
    "impl/gpt/model.py",
    "impl/gpt/attention.py",
    "impl/data/corpus.py",
    "impl/data/tokens.py",
    "impl/bpe/tokenizer.py",
    "impl/bpe/fast.py",
    "impl/bpe/naive.py",
    "impl/bpe/regex_split.py",
    "impl/bpe/vocab.py",
    "impl/char_gpt/train.py",
)


@dataclass(frozen=True)
class Recipe:
    """Everything a build depends on besides the code: corpus, tokenizer, model shape, training."""

    name: str
    description: str
    corpus: str
    tokenizer: dict[str, Any]  # {"kind": "char"} or {"kind": "bpe", "vocab_size", "pattern", "special_tokens"}
    model: GPTConfig
    train: TrainConfig
    val_fraction: float = 0.1
    wikitext_eval: bool = False  # also report bits per byte on WikiText-2's test split when it is present
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as JSON-serialisable data (what the cache key hashes, beside the code)."""
        return {"name": self.name, "corpus": self.corpus, "tokenizer": self.tokenizer,
                "model_config": self.model.to_dict(), "train_config": asdict(self.train),
                "val_fraction": self.val_fraction, "wikitext_eval": self.wikitext_eval, "extra": self.extra}


def corpus_sha256(corpus: str) -> str:
    """sha256 of the corpus's full text (UTF-8)."""
    return hashlib.sha256(load_text(corpus).encode("utf-8")).hexdigest()


def code_sha256(files: tuple[str, ...] | None = None) -> str:
    """sha256 over the path and bytes of each source file that trains a model (default ``CODE_FILES``,
    relative to the checkout; a missing file counts as absent)."""
    h = hashlib.sha256()
    for rel in CODE_FILES if files is None else files:
        path = ROOT / rel
        h.update(f"{rel}\n".encode())
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
    return h.hexdigest()


def cache_key(recipe: Recipe) -> str:
    """The cache key of ``recipe``: sha256 of the recipe, its corpus's sha256 and the training code's sha256."""
    doc = {"recipe": recipe.as_dict(), "corpus_sha256": corpus_sha256(recipe.corpus), "code_sha256": code_sha256()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- tokenizers in metadata


def tokenizer_from_metadata(meta: dict[str, Any]) -> Tokenizer | CharTokenizer:
    """The tokenizer an entry's metadata describes (``{"kind": "char", "chars"}`` or the BPE merges)."""
    tok = meta["tokenizer"]
    if tok["kind"] == "char":
        return CharTokenizer(list(tok["chars"]))
    if tok["kind"] == "bpe":
        specials = sorted(tok["special_tokens"], key=tok["special_tokens"].get)
        out = Tokenizer(tok["merges"], tok["pattern"], specials)
        if out.special_tokens != tok["special_tokens"]:
            raise ValueError(f"tokenizer metadata: special token ids {tok['special_tokens']} do not follow the merges")
        return out
    raise ValueError(f"unknown tokenizer kind {tok['kind']!r}")


def token_nbytes(tokenizer: Tokenizer | CharTokenizer):
    """A function id -> number of UTF-8 bytes that id spells."""
    if isinstance(tokenizer, CharTokenizer):
        return lambda i: len(tokenizer.chars[i].encode("utf-8"))
    return lambda i: len(tokenizer.token_bytes(i))


def _tokenizer_meta(tokenizer: Tokenizer | CharTokenizer) -> dict[str, Any]:
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars, "vocab_size": tokenizer.vocab_size}
    return {"kind": "bpe", "vocab_size": tokenizer.vocab_size, "pattern": tokenizer.pattern,
            "pattern_name": tokenizer.pattern_name, "special_tokens": tokenizer.special_tokens,
            "merges": [list(m) for m in tokenizer.merges]}


# ---------------------------------------------------------------- held-out data


def wikitext2_test_path() -> Path | None:
    """``shared/data/wikitext-2/test.txt`` in or beside the checkout, or None when absent (a fresh clone)."""
    for base in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        path = base / "wikitext-2" / "test.txt"
        if path.is_file():
            return path
    return None


def prepare_text(recipe: Recipe) -> tuple[Tokenizer | CharTokenizer, str, str]:
    """(tokenizer, train text, held-out text): the corpus cut 90/10, the tokenizer learnt on the 90%."""
    text = load_text(recipe.corpus)
    train_text, val_text = split_text(text, recipe.val_fraction)
    spec = recipe.tokenizer
    if spec["kind"] == "char":
        return CharTokenizer.from_text(text), train_text, val_text  # nanoGPT: characters of the whole text
    return train_bpe(train_text, spec["vocab_size"], spec["pattern"], spec["special_tokens"]), train_text, val_text


def encode(tokenizer: Tokenizer | CharTokenizer, text: str) -> np.ndarray:
    """Ids of ``text`` as uint16 (special tokens' strings in the text are plain text)."""
    ids = tokenizer.encode(text) if isinstance(tokenizer, CharTokenizer) else tokenizer.encode_ordinary(text)
    return np.asarray(ids, dtype=np.uint16)


# ---------------------------------------------------------------- the build


def _say(msg: str) -> None:
    print(f"zoo: {msg}", file=sys.stderr, flush=True)


def build(recipe: Recipe, progress: bool = True) -> tuple[GPT, dict[str, Any]]:
    """Train ``recipe`` from scratch (seeded) and evaluate it on the held-out text; returns (model, metadata)."""
    t0 = time.perf_counter()
    tokenizer, train_text, val_text = prepare_text(recipe)
    model_cfg = recipe.model
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"recipe {recipe.name}: model vocab_size {model_cfg.vocab_size} != the tokenizer's "
                         f"{tokenizer.vocab_size}")
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    prep_s = time.perf_counter() - t0
    _say(f"{recipe.name}: {len(train_ids):,} train / {len(val_ids):,} held-out tokens (vocab "
         f"{tokenizer.vocab_size:,}), prepared in {prep_s:.1f}s; training {recipe.train.max_iters} iterations")
    torch.manual_seed(recipe.train.seed)
    model = GPT(model_cfg)
    result: TrainResult = train(model, train_ids, val_ids, recipe.train, progress=progress)
    model.eval()
    t_eval = time.perf_counter()
    nbytes = token_nbytes(tokenizer)
    heldout = evaluate_ids(model, val_ids, nbytes)
    _say(f"{recipe.name}: held-out {heldout['loss_nats_per_token']:.4f} nats/token, "
         f"{heldout['bits_per_byte']:.4f} bits per byte")
    wikitext: dict[str, Any] = {"status": "not evaluated for this recipe"}
    if recipe.wikitext_eval:
        path = wikitext2_test_path()
        if path is None:
            wikitext = {"status": "absent: no shared/data/wikitext-2/test.txt beside the checkout"}
        else:
            wiki = evaluate_ids(model, encode(tokenizer, path.read_text(encoding="utf-8")), nbytes)
            wikitext = {"status": "evaluated", "path": str(path), "form": "tokenized WikiText-2 (rare words as <unk>)",
                        **_rounded(wiki)}
            _say(f"{recipe.name}: WikiText-2 test {wiki['bits_per_byte']:.4f} bits per byte")
    eval_s = time.perf_counter() - t_eval
    meta = {
        "zoo_name": recipe.name,
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(recipe.train),
        "recipe": recipe.as_dict(),
        "corpus": recipe.corpus,
        "corpus_sha256": corpus_sha256(recipe.corpus),
        "tokenizer": _tokenizer_meta(tokenizer),
        "special_token_ids": {} if isinstance(tokenizer, CharTokenizer) else tokenizer.special_tokens,
        "parameters": model.num_params(),
        "train_tokens": len(train_ids),
        "heldout_tokens": len(val_ids),
        "tokens_seen": recipe.train.max_iters * recipe.train.batch_size * recipe.train.block_size,
        "train_wall_s": round(result.wall_s, 1),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "prepare_s": round(prep_s, 1),
        "eval_s": round(eval_s, 1),
        "torch_threads": torch.get_num_threads(),
        "loss_curve": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items() if k != "kind"}
                       for row in result.history],
        "final_val_loss_estimate": result.final_val_loss,
        "heldout": _rounded(heldout),
        "heldout_bits_per_byte": heldout["bits_per_byte"],
        "heldout_loss_nats_per_token": heldout["loss_nats_per_token"],
        "wikitext2_test": wikitext,
    }
    return model, meta


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in figures.items()}
