"""The ``Tokenizer`` later projects use: merges + split pattern + special tokens, save and load."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from impl.bpe import fast, naive
from impl.bpe.io import read_tokenizer_file, write_tokenizer_file
from impl.bpe.regex_split import PATTERNS, AllowedSpecial, resolve_pattern
from impl.bpe.vocab import N_BYTES, Pair, as_pairs, special_token_ids

ENDOFTEXT = "<|endoftext|>"
TRAINERS = {"naive": naive.train_merges, "fast": fast.train_merges}


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode(text) -> ids``, ``decode(ids) -> text``.

    ``encoder="fast"`` (default) uses the cached heap encoder, ``"naive"`` the textbook one;
    both give the same ids.
    """

    def __init__(
        self,
        merges: Sequence[Sequence[int]],
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        encoder: str = "fast",
        metadata: dict[str, Any] | None = None,
    ):
        if encoder not in ("fast", "naive"):
            raise ValueError(f'encoder must be "fast" or "naive", got {encoder!r}')
        self.merges: list[Pair] = as_pairs(merges)
        self.pattern = resolve_pattern(pattern)
        self.special_tokens: dict[str, int] = special_token_ids(len(self.merges), list(special_tokens))
        self.encoder = encoder
        self.metadata = dict(metadata or {})
        self._fast = fast.FastEncoder(self.merges, self.pattern, list(self.special_tokens))

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes + merges + special tokens."""
        return N_BYTES + len(self.merges) + len(self.special_tokens)

    @property
    def pattern_name(self) -> str | None:
        """``gpt2`` / ``gpt4`` when the pattern is one of the named ones, else None."""
        return next((name for name, regex in PATTERNS.items() if regex == self.pattern), None)

    @property
    def eot_id(self) -> int:
        """The id of ``<|endoftext|>`` (the document separator pre-training inserts)."""
        if ENDOFTEXT not in self.special_tokens:
            raise KeyError(f"this tokenizer has no {ENDOFTEXT} token; its special tokens: {list(self.special_tokens)}")
        return self.special_tokens[ENDOFTEXT]

    def encode(self, text: str, allowed_special: AllowedSpecial = "none_raise") -> list[int]:
        """Ids of ``text``. A special token's string in ``text`` is an error unless allowed:
        ``allowed_special="all"``, a set of tokens, or ``"none"`` to encode it as plain text."""
        if self.encoder == "naive":
            return naive.encode_ids(text, self.merges, self.pattern, list(self.special_tokens), allowed_special)
        return self._fast.encode(text, allowed_special)

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with every special token's string treated as plain text."""
        return self.encode(text, allowed_special="none")

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        if self.encoder == "naive":
            return naive.decode_ids(ids, self.merges, list(self.special_tokens))
        return self._fast.decode(ids)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one id stands for (a special token: its UTF-8 string)."""
        return self._fast.decode_bytes([token])

    def register_special_tokens(self, tokens: Sequence[str]) -> dict[str, int]:
        """Add special tokens after the existing ones; returns the new token -> id."""
        clash = [t for t in tokens if t in self.special_tokens]
        if clash:
            raise ValueError(f"special tokens already registered: {clash}")
        names = list(self.special_tokens) + list(tokens)
        self.special_tokens = special_token_ids(len(self.merges), names)
        self._fast = fast.FastEncoder(self.merges, self.pattern, names)
        return {t: self.special_tokens[t] for t in tokens}

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer file (format in README); returns its path."""
        return write_tokenizer_file(
            path,
            {
                "pattern": self.pattern,
                "pattern_name": self.pattern_name,
                "special_tokens": self.special_tokens,
                "metadata": self.metadata,
                "merges": self.merges,
            },
        )

    @classmethod
    def load(cls, path: str | Path, encoder: str = "fast") -> Tokenizer:
        """A tokenizer read from a file written by ``save``."""
        doc = read_tokenizer_file(path)
        specials = sorted(doc["special_tokens"], key=doc["special_tokens"].get)
        tok = cls(doc["merges"], doc["pattern"], specials, encoder, doc.get("metadata"))
        if tok.special_tokens != doc["special_tokens"]:
            raise ValueError(
                f"tokenizer file {path}: special token ids {doc['special_tokens']} do not follow the merges "
                f"(expected {tok.special_tokens})"
            )
        return tok

    def __repr__(self) -> str:
        pattern, special = self.pattern_name or "custom", list(self.special_tokens)
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={pattern}, special={special})"


def train(
    text: str,
    vocab_size: int,
    pattern: str = "gpt4",
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    trainer: str = "fast",
    progress: bool = False,
) -> Tokenizer:
    """A tokenizer of ``vocab_size`` ids (bytes + merges + special tokens) learned on ``text``."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {sorted(TRAINERS)}, got {trainer!r}")
    start = time.perf_counter()
    kwargs = {"progress": progress} if trainer == "fast" else {}
    merges = TRAINERS[trainer](text, vocab_size, resolve_pattern(pattern), list(special_tokens), **kwargs)
    seconds = time.perf_counter() - start
    meta = {
        "trainer": trainer,
        "vocab_size_requested": vocab_size,
        "train_chars": len(text),
        "train_seconds": seconds,
    }
    return Tokenizer(merges, pattern, special_tokens, metadata=meta)


def load(path: str | Path) -> Tokenizer:
    """The tokenizer saved at ``path``."""
    return Tokenizer.load(path)
