"""The tokenizer file: one JSON document, written atomically (see README "File format").

{"format": "handson-bpe", "version": 1,
 "pattern": "<split regex>", "pattern_name": "gpt4",
 "merges": [[a, b], ...],                # merge i creates id 256 + i
 "special_tokens": {"<|endoftext|>": 10000},
 "metadata": {...}}                      # how it was trained (free-form)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = "handson-bpe"
VERSION = 1


def write_tokenizer_file(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (pattern, merges, special_tokens, ...) as a tokenizer file; returns its path.

    The file is written beside its target and renamed over it, so a crash never leaves half
    a tokenizer where a complete one is expected.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "version": VERSION, **data}
    merges = doc.pop("merges")
    # the merges go last, one per line, so the file reads (and diffs) as a list of rules
    head = json.dumps(doc, indent=2, ensure_ascii=False).removesuffix("\n}")
    rows = ",\n".join(f"    {json.dumps(list(m))}" for m in merges)
    text = f'{head},\n  "merges": [\n{rows}\n  ]\n}}\n'
    # a unique temporary name: two processes training the same tokenizer never share a half file
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".part", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a tokenizer file is meant to be shared
    os.replace(tmp, path)
    return path


def read_tokenizer_file(path: str | Path) -> dict[str, Any]:
    """The contents of a tokenizer file, checked: format, version and the required keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist; train one with `python -m impl.bpe train`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from None
    if doc.get("format") != FORMAT:
        raise ValueError(f"tokenizer file {path}: format must be {FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("version") != VERSION:
        raise ValueError(f"tokenizer file {path}: version {doc.get('version')!r} is not supported (want {VERSION})")
    for key in ("pattern", "merges", "special_tokens"):
        if key not in doc:
            raise ValueError(f"tokenizer file {path} lacks the key {key!r}")
    return doc
