"""Corpus in, tokenizer file out: the training pipeline and the default 10K tokenizer.

Corpora: ``wikitext`` (WikiText-103 raw, train split, through ``datasets``; offline it falls
back to Shakespeare with a one-line message), ``wikitext-2``, ``shakespeare`` (default),
``tinyshakespeare``, or a path to a UTF-8 text file. Non-WikiText corpora are cut 90/10 and
only the first 90% is trained on, so the last 10% stays held out for measuring compression.
Files go to ``$HANDSON_CACHE/bpe/`` (default ``~/.cache/handson-llm/bpe/``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from impl.bpe.tokenizer import ENDOFTEXT, Tokenizer, load, train
from impl.data.corpus import cache_dir, load_text, split_text
from impl.data.wikitext import load_wikitext_or_fallback

DEFAULT_VOCAB_SIZE = 10_000
DEFAULT_CORPUS = "shakespeare"
VAL_FRACTION = 0.1
WIKITEXT_NAMES = {
    "wikitext": "wikitext-103-raw-v1",
    "wikitext-103": "wikitext-103-raw-v1",
    "wikitext-2": "wikitext-2-raw-v1",
}


def tokenizer_dir() -> Path:
    """Where trained tokenizers are cached: ``$HANDSON_CACHE/bpe``."""
    return cache_dir() / "bpe"


def default_path(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: str = DEFAULT_CORPUS, pattern: str = "gpt4") -> Path:
    """The cache file of a (corpus, vocab size, pattern) tokenizer: ``bpe/shakespeare-10000-gpt4.json``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).stem if os.sep in corpus else corpus)
    tag = pattern if pattern in ("gpt2", "gpt4") else "custom"
    return tokenizer_dir() / f"{stem}-{vocab_size}-{tag}.json"


def training_text(corpus: str = DEFAULT_CORPUS) -> tuple[str, str]:
    """(text to train on, where it came from): WikiText's train split, or the first 90% of a corpus."""
    if corpus in WIKITEXT_NAMES:
        text, source = load_wikitext_or_fallback("train", WIKITEXT_NAMES[corpus], fallback=DEFAULT_CORPUS)
        if source.startswith("wikitext"):
            return text, source
        corpus = source
    return split_text(load_text(corpus), VAL_FRACTION)[0], corpus


def heldout_text(corpus: str = DEFAULT_CORPUS) -> str:
    """The text kept out of training: the last 10% of a corpus (WikiText: its validation split)."""
    if corpus in WIKITEXT_NAMES:
        text, source = load_wikitext_or_fallback("validation", WIKITEXT_NAMES[corpus], fallback=DEFAULT_CORPUS)
        if source.startswith("wikitext"):
            return text
        corpus = source
    return split_text(load_text(corpus), VAL_FRACTION)[1]


def train_tokenizer(
    corpus: str = DEFAULT_CORPUS,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out: str | Path | None = None,
    pattern: str = "gpt4",
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    trainer: str = "fast",
    progress: bool = False,
) -> tuple[Tokenizer, Path]:
    """Train on a corpus and save; returns the tokenizer and the file it was written to."""
    start = time.perf_counter()
    text, source = training_text(corpus)
    tok = train(text, vocab_size, pattern, special_tokens, trainer, progress)
    tok.metadata.update(corpus=source, total_seconds=time.perf_counter() - start, cpu_count=os.cpu_count())
    path = Path(out) if out is not None else default_path(vocab_size, source, pattern)
    return tok, tok.save(path)


def default_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: str = DEFAULT_CORPUS) -> Path:
    """Path of the default tokenizer (10K ids, GPT-4 split, Shakespeare), trained on first use."""
    path = default_path(vocab_size, corpus)
    if not path.is_file():
        _, path = train_tokenizer(corpus, vocab_size, path)
    return path


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: str = DEFAULT_CORPUS) -> Tokenizer:
    """The default tokenizer, loaded (and trained first if it is not in the cache yet)."""
    return load(default_tokenizer_path(vocab_size, corpus))
