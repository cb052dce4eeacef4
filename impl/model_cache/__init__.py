"""The model cache: every project loads its trained models from here; each is built once.

A model is registered by name with a builder (trains or builds it, returns ``(model, metadata)``)
and a ``make_model(metadata)`` that makes an empty model of the right shape. ``get(name)`` returns
the cached ``(model, metadata)``, building it first when it is absent. Layout under
``cache_dir()/models`` (``$HANDSON_CACHE``, see ``impl.data.corpus.cache_dir``)::

    <name>/model.safetensors     weights + metadata (impl.train.checkpoint's format, with its own hash)
    <name>/manifest.json         {"name", "files": {file: sha256}, "built_at", "build_s"}
    <name>.lock                  flock: shared while reading an entry, exclusive while building one
    .<name>.build-<pid>/         a build in progress (removed by the next build if its builder died)
    <name>.corrupt-<timestamp>/  an entry that failed its check, kept for inspection
    <name>.stale-<timestamp>/    a stale entry (another cache key) while its replacement builds

Why it cannot lose or half-show a model:
- a build writes into ``.<name>.build-<pid>`` and publishes it with one ``os.rename``: the entry is
  either absent or complete (files fsynced before the rename);
- two processes asking at once: the first takes the exclusive lock and builds, the second blocks on
  the lock (saying so in one line) and then loads what was published; the kernel drops the lock of a
  builder that dies, so a killed build never blocks the next one;
- every load checks the manifest's sha256 of each file first; an entry that fails (edited, truncated,
  a file missing) gets one line, is moved aside and rebuilt: it is never loaded;
- a model registered with a ``key`` (a hash of its recipe and of the code that trains it, see
  ``impl.zoo``) stores that key in its metadata (``cache_key``); an entry whose key differs from the
  current one is stale: ``state`` says so, and ``get`` moves it aside and rebuilds it, never loads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from impl.data.corpus import cache_dir
from impl.gpt.model import GPT, GPTConfig
from impl.train.checkpoint import CheckpointCorrupt, fsync_path, load_checkpoint, read_meta, save_checkpoint

MODEL_FILE = "model.safetensors"
KEY_FIELD = "cache_key"
MANIFEST_FILE = "manifest.json"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")

Builder = Callable[[], tuple[torch.nn.Module, dict[str, Any]]]


class CacheEntryCorrupt(ValueError):
    """A cache entry failed its check (a file missing, or not matching its manifest's sha256)."""


class CacheEntryStale(ValueError):
    """A cache entry was built from another recipe or other code: its ``cache_key`` is not the current key."""


def gpt_from_metadata(metadata: dict[str, Any]) -> torch.nn.Module:
    """An untrained ``GPT`` of the shape in ``metadata["model_config"]`` (the default ``make_model``)."""
    return GPT(GPTConfig(**metadata["model_config"]))


@dataclass(frozen=True)
class CachedModel:
    """A registry entry: how to build the model, and how to make an empty one to load it into."""

    name: str
    build: Builder
    make_model: Callable[[dict[str, Any]], torch.nn.Module]
    description: str
    key: Callable[[], str] | None = None  # the current cache key (recipe + code); None: never stale


_REGISTRY: dict[str, CachedModel] = {}


def register(name: str, build: Builder, make_model: Callable[[dict[str, Any]], torch.nn.Module] = gpt_from_metadata,
             description: str = "", replace: bool = False, key: Callable[[], str] | None = None) -> CachedModel:
    """Register ``build`` under ``name`` (lower-case letters, digits, ``.``, ``_``, ``-``); returns the entry.
    ``build()`` returns ``(model, metadata)`` with JSON-serialisable metadata that ``make_model`` understands.
    ``key()``, when given, returns the current cache key: it is stored in the metadata as ``cache_key``
    at build time, and an entry whose stored key differs is stale (rebuilt by ``get``, never loaded)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"model cache: name {name!r} must match {NAME.pattern} (it becomes a directory name)")
    if name in _REGISTRY and not replace:
        raise ValueError(f"model cache: {name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[name] = CachedModel(name, build, make_model, description, key)
    return _REGISTRY[name]


def registered() -> dict[str, CachedModel]:
    """Every registered model, by name."""
    return dict(_REGISTRY)


def models_dir() -> Path:
    """Where entries live: ``cache_dir()/models``."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def entry_dir(name: str) -> Path:
    """The directory of the published entry ``name`` (it may not exist)."""
    return models_dir() / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(name: str) -> Path:
    """Check the entry ``name`` against its manifest; returns its directory. Raises FileNotFoundError
    when it is absent and CacheEntryCorrupt (one line) when a file is missing or its hash differs."""
    entry = entry_dir(name)
    if not entry.is_dir():
        raise FileNotFoundError(f"model cache: no entry {name!r} in {entry.parent}")
    try:
        files = json.loads((entry / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheEntryCorrupt(f"model cache entry {entry} is corrupt: unreadable {MANIFEST_FILE} "
                                f"({type(e).__name__})") from e
    if MODEL_FILE not in files:
        raise CacheEntryCorrupt(f"model cache entry {entry} is corrupt: its manifest lists no {MODEL_FILE}")
    for file, expected in sorted(files.items()):
        if not (entry / file).is_file():
            raise CacheEntryCorrupt(f"model cache entry {entry} is corrupt: {file} is missing")
        if _sha256(entry / file) != expected:
            raise CacheEntryCorrupt(f"model cache entry {entry} is corrupt: {file} does not match its sha256")
    return entry


def _check_key(spec: CachedModel, metadata: dict[str, Any], current: str | None) -> None:
    """Raise CacheEntryStale when the entry's stored key is not ``current`` (no check without a key)."""
    if current is not None and metadata.get(KEY_FIELD) != current:
        stored = str(metadata.get(KEY_FIELD) or "none")[:12]
        raise CacheEntryStale(f"model cache entry {entry_dir(spec.name)} is stale: built with key {stored}..., "
                              f"the current recipe and code give {current[:12]}...")


def _load(spec: CachedModel, current_key: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    entry = verify(spec.name)
    path = entry / MODEL_FILE
    metadata = read_meta(path)  # first the metadata: it says which model to make
    _check_key(spec, metadata, current_key)
    model = spec.make_model(metadata)
    load_checkpoint(path, model)  # checks the file's own hash too
    return model.eval(), metadata


@contextmanager
def _locked(name: str, mode: int) -> Iterator[None]:
    """Hold ``<name>.lock`` in ``mode`` (fcntl.LOCK_SH or LOCK_EX); the kernel releases it if we die."""
    fd = os.open(models_dir() / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"model cache: {name!r} is locked by another process (building it, or reading it while we "
                  "would repair it); waiting", file=sys.stderr)
            fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _build(spec: CachedModel) -> None:
    """Build ``spec`` into a private directory and publish it with one rename (exclusive lock held)."""
    root = models_dir()
    for stale in root.glob(f".{spec.name}.build-*"):  # left by a builder that died: we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = root / f".{spec.name}.build-{os.getpid()}"
    work.mkdir()
    t0 = time.perf_counter()
    key = spec.key() if spec.key is not None else None  # the code and recipe as they are when the build starts
    model, metadata = spec.build()
    if key is not None:
        metadata = {**metadata, KEY_FIELD: key}
    save_checkpoint(work / MODEL_FILE, model, meta=metadata)  # fsynced
    manifest = {
        "name": spec.name,
        "files": {MODEL_FILE: _sha256(work / MODEL_FILE)},
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_s": round(time.perf_counter() - t0, 3),
    }
    (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(work / MANIFEST_FILE)
    fsync_path(work)
    os.rename(work, root / spec.name)  # the publication: before it nothing is visible, after it all is
    fsync_path(root)


def _lookup(name: str) -> CachedModel:
    if name not in _REGISTRY:
        import impl.zoo  # noqa: F401  (registers the zoo's named models: char, bpe-small, bpe-base)
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"model cache: no model named {name!r} is registered (registered: {known})")
    return _REGISTRY[name]


def get(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached model ``name`` (in eval mode) and its metadata, built first if absent or corrupt.

    Safe to call from many processes at once: exactly one builds, the others wait and load it.
    A stale entry (its ``cache_key`` is not the current key) is moved aside and rebuilt."""
    spec = _lookup(name)
    current = spec.key() if spec.key is not None else None
    with _locked(name, fcntl.LOCK_SH):  # readers share; a builder or repairer excludes them
        if entry_dir(name).is_dir():
            try:
                return _load(spec, current)
            except (CacheEntryCorrupt, CacheEntryStale, CheckpointCorrupt, FileNotFoundError):
                pass  # repaired below, under the exclusive lock
    with _locked(name, fcntl.LOCK_EX):
        entry = entry_dir(name)
        stale = None
        if entry.is_dir():  # another process may have built or repaired it while we waited
            try:
                return _load(spec, current)
            except (CacheEntryCorrupt, CheckpointCorrupt) as e:
                aside = entry.with_name(f"{name}.corrupt-{datetime.now():%Y%m%dT%H%M%S.%f}")
                os.rename(entry, aside)
                print(f"{e}; moved it to {aside.name} and rebuilding {name!r}", file=sys.stderr)
            except CacheEntryStale as e:
                stale = entry.with_name(f"{name}.stale-{datetime.now():%Y%m%dT%H%M%S.%f}")
                os.rename(entry, stale)
                print(f"{e}; rebuilding {name!r}", file=sys.stderr)
        _build(spec)
        if stale is not None:  # the new entry is published: the old one has nothing left to give
            shutil.rmtree(stale, ignore_errors=True)
        return _load(spec, current)


def metadata(name: str) -> dict[str, Any]:
    """The metadata of the entry ``name`` after checking its files against the manifest (no lock, no
    build, no tensors read). Raises FileNotFoundError when absent, CacheEntryCorrupt / CheckpointCorrupt."""
    return read_meta(verify(name) / MODEL_FILE)


def state(name: str) -> str:
    """``"cached"``, ``"absent"``, ``"stale"`` (built from another recipe or code; registered models
    with a key only) or ``"corrupt: <reason>"`` for the entry ``name`` (no lock, no build)."""
    try:
        meta = metadata(name)
    except FileNotFoundError:
        return "absent"
    except (CacheEntryCorrupt, CheckpointCorrupt) as e:
        return f"corrupt: {str(e).split(': ', 1)[-1]}"
    spec = _REGISTRY.get(name)
    if spec is not None and spec.key is not None and meta.get(KEY_FIELD) != spec.key():
        return "stale"
    return "cached"


def entries_on_disk() -> list[str]:
    """Names of the published entries in the cache (registered or not), sorted."""
    return sorted(p.name for p in models_dir().iterdir()
                  if p.is_dir() and NAME.fullmatch(p.name) and ".corrupt-" not in p.name and ".stale-" not in p.name)
