"""Corpus -> BPE ids -> two memory-mapped uint16 token files (``train.bin``, ``val.bin``).

nanoGPT's ``prepare.py`` recipe: encode once, store the ids as a flat uint16 array, and let
training read random windows through ``np.memmap`` so the corpus never has to fit in memory.
Files are cached under ``$HANDSON_CACHE/pretrain/<corpus>-<tokenizer hash>/`` and written
atomically: ``meta.json`` is renamed into place last, so a directory without it is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from impl.bpe import default_tokenizer_path, load
from impl.data.corpus import cache_dir, load_text, split_text
from impl.data.wikitext import WikiTextUnavailable, load_wikitext

TOKEN_DTYPE = np.uint16  # ids up to 65,535: ample for a 10K vocabulary, half the bytes of int32
META_FILE = "meta.json"
WIKITEXT = "wikitext-103"


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer (``impl.bpe`` and ``CharTokenizer`` both fit)."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class TokenFiles:
    """A prepared corpus: read-only memmaps of the train and val ids, and what made them."""

    directory: Path
    train: np.ndarray  # np.memmap, uint16
    val: np.ndarray
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def text_pieces(text: str, piece_chars: int = 1 << 16) -> Iterator[str]:
    """``text`` cut into pieces of about ``piece_chars`` that encode to the same ids as the whole.

    Cuts fall only on a single newline between two non-space characters. Neither the GPT-2 nor
    the GPT-4 split pattern puts that newline and the character after it in one chunk, and a
    lone newline is its own chunk at the end of a piece as in the whole text (a run of blank
    lines would not be: GPT-2's ``\\s+(?!\\S)`` splits it differently at the end of a string).
    So no BPE merge crosses a cut, and encoding piece by piece equals encoding the whole text.
    """
    start = 0
    boundary = re.compile(r"(?<=\S)\n(?=\S)")
    while start < len(text):
        cut = boundary.search(text, start + piece_chars)
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end


def encode_to_file(text: str, tokenizer: Tokenizer, path: Path, progress: bool = True) -> int:
    """Encode ``text`` piece by piece, appending uint16 ids to ``path`` (atomically); returns the count."""
    tmp = path.with_name(path.name + ".tmp")
    n_tokens = 0
    with open(tmp, "wb") as f, tqdm(total=len(text), desc=f"encode {path.name}", unit="char",
                                    unit_scale=True, disable=not progress, leave=False) as bar:
        for piece in text_pieces(text):
            ids = np.asarray(tokenizer.encode(piece), dtype=np.int64)
            if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
                raise ValueError(f"token id out of the uint16 range while encoding {path.name}")
            f.write(ids.astype(TOKEN_DTYPE).tobytes())
            n_tokens += len(ids)
            bar.update(len(piece))
    os.replace(tmp, path)
    return n_tokens


def write_token_files(
    train_text: str, val_text: str, tokenizer: Tokenizer, out_dir: str | Path,
    meta: dict[str, Any] | None = None, progress: bool = True,
) -> TokenFiles:
    """Encode both splits into ``out_dir/{train,val}.bin`` and describe them in ``meta.json``."""
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"vocab_size {tokenizer.vocab_size} does not fit uint16 token files (max 65,536)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until meta.json returns
    counts = {name: encode_to_file(text, tokenizer, out / f"{name}.bin", progress)
              for name, text in (("train", train_text), ("val", val_text))}
    if min(counts.values()) < 2:
        raise ValueError(f"a split encodes to fewer than 2 tokens ({counts}): the corpus is too small")
    full_meta = {**(meta or {}), "vocab_size": tokenizer.vocab_size, "dtype": "uint16",
                 "train_tokens": counts["train"], "val_tokens": counts["val"],
                 "train_chars": len(train_text), "val_chars": len(val_text)}
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(full_meta, indent=1))
    os.replace(tmp, out / META_FILE)
    return load_token_files(out)


def load_token_files(directory: str | Path) -> TokenFiles:
    """The prepared corpus in ``directory`` as read-only memmaps (no ids are read yet)."""
    out = Path(directory)
    if not (out / META_FILE).is_file():
        raise FileNotFoundError(
            f"{out} holds no prepared corpus (no {META_FILE}); run `python -m impl.pretrain prepare` first"
        )
    meta = json.loads((out / META_FILE).read_text())
    train, val = (np.memmap(out / f"{name}.bin", dtype=TOKEN_DTYPE, mode="r") for name in ("train", "val"))
    return TokenFiles(out, train, val, meta)


def corpus_splits(corpus: str, val_fraction: float = 0.1) -> tuple[str, str, str]:
    """(train text, val text, corpus actually used). WikiText-103 comes with its own splits via
    ``datasets`` when online; offline we say so in one line and fall back to Shakespeare."""
    if corpus == WIKITEXT:
        try:
            return load_wikitext("train"), load_wikitext("validation"), WIKITEXT
        except WikiTextUnavailable as e:
            reason = " ".join(str(e).split())
            print(f"WikiText-103 unavailable ({reason}); using the default corpus 'shakespeare' instead.",
                  file=sys.stderr)
            corpus = "shakespeare"
    train_text, val_text = split_text(load_text(corpus), val_fraction)
    return train_text, val_text, corpus


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def default_token_dir(corpus: str, tokenizer_sha: str) -> Path:
    """``$HANDSON_CACHE/pretrain/<corpus>-<first 12 hex of the tokenizer file's sha256>``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(corpus).name if os.sep in corpus else corpus)
    return cache_dir() / "pretrain" / f"{name}-{tokenizer_sha[:12]}"


def prepare(
    corpus: str = "shakespeare", tokenizer_path: str | Path | None = None, out_dir: str | Path | None = None,
    val_fraction: float = 0.1, max_chars: int | None = None, force: bool = False, progress: bool = True,
) -> TokenFiles:
    """Token files for ``corpus`` (``shakespeare``, ``wikitext-103``, or a text file) with the BPE
    tokenizer at ``tokenizer_path`` (default: project 2's 10K BPE, trained on first use), reused
    from the cache when the same corpus, tokenizer and split made them."""
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path()
    sha = file_sha256(tokenizer_path)
    train_text, val_text, used = corpus_splits(corpus, val_fraction)
    if max_chars is not None:  # a shorter run: the first max_chars of train, a tenth of that of val
        train_text, val_text = train_text[:max_chars], val_text[: max(max_chars // 10, 1000)]
    out = Path(out_dir) if out_dir else default_token_dir(used, sha)
    if max_chars is not None and not out_dir:
        out = out.with_name(f"{out.name}-{max_chars}chars")
    wanted = {"corpus": used, "tokenizer": str(tokenizer_path), "tokenizer_sha256": sha,
              "val_fraction": val_fraction, "max_chars": max_chars}
    if not force and (out / META_FILE).is_file():
        cached = load_token_files(out)
        if all(cached.meta.get(k) == v for k, v in wanted.items() if k != "tokenizer"):
            return cached
    return write_token_files(train_text, val_text, load(tokenizer_path), out, wanted, progress)
