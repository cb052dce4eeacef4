"""WikiText through the Hugging Face ``datasets`` loader, with an offline fallback.

``load_wikitext`` is the real loader: it downloads (or reads from the datasets cache) the
``wikitext-103-raw-v1`` split and joins its lines. Offline it raises ``WikiTextUnavailable``
quickly: a 3-second reachability probe runs first, because ``datasets`` itself retries for
~25 seconds before giving up. ``load_wikitext_or_fallback`` is the pipeline's policy: WikiText
when it can be had, otherwise one clear line on stderr and the default corpus instead.
"""

from __future__ import annotations

import os
import socket
import sys

from impl.data.corpus import load_text

HUB_HOST = "huggingface.co"
DEFAULT_NAME = "wikitext-103-raw-v1"


class WikiTextUnavailable(RuntimeError):
    """WikiText could not be loaded (offline, no cached copy, or ``datasets`` missing)."""


def _offline_mode() -> bool:
    # with these set, datasets reads its local cache without touching the network
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_wikitext(split: str = "train", name: str = DEFAULT_NAME) -> str:
    """The text of one WikiText split (``train``, ``validation``, ``test``), lines joined as released."""
    if not _offline_mode() and not _hub_reachable():
        raise WikiTextUnavailable(
            f"WikiText ({name}, {split}) needs the Hugging Face Hub and {HUB_HOST} is unreachable; "
            "set HF_DATASETS_OFFLINE=1 to use a copy already in the datasets cache"
        )
    try:
        import datasets
    except ImportError as e:
        raise WikiTextUnavailable("WikiText needs the `datasets` package: pip install datasets") from e
    try:
        rows = datasets.load_dataset("wikitext", name, split=split)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError ... offline
        raise WikiTextUnavailable(f"WikiText ({name}, {split}) could not be loaded: {e.__class__.__name__}: {e}") from e
    return "".join(rows["text"])


def load_wikitext_or_fallback(
    split: str = "train", name: str = DEFAULT_NAME, fallback: str = "shakespeare"
) -> tuple[str, str]:
    """(text, source): WikiText when available, else the ``fallback`` corpus, saying so on stderr."""
    try:
        return load_wikitext(split, name), f"wikitext:{name}:{split}"
    except WikiTextUnavailable as e:
        reason = " ".join(str(e).split())  # one line, whatever the underlying error printed
        print(f"WikiText unavailable ({reason}); using the {fallback!r} corpus instead.", file=sys.stderr)
        return load_text(fallback), fallback
