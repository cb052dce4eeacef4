"""Checkpoints in safetensors, written atomically, with everything a bit-exact resume needs.

One file holds the model weights (``model.*``), the optimizer's per-parameter state
(``optim.<param index>.<name>``), and the RNG states (``rng.*`` as uint8 tensors); the JSON
metadata holds the iteration, the configs and the optimizer's scalar state.

Integrity: the metadata also holds ``sha256``, a hash of every tensor (name, dtype, shape, bytes)
and of the other metadata. It lives *inside* the file, so data and hash are replaced together by
one rename; a sidecar hash file could not be swapped atomically with the data. ``load_checkpoint``
recomputes it before touching the model and raises ``CheckpointCorrupt`` on any mismatch, on a
torn or truncated file, and on a file without a hash: a corrupt checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from impl.gpt.model import load_strict

HASH_KEY = "sha256"


class CheckpointCorrupt(ValueError):
    """A checkpoint failed its integrity check (torn, truncated, edited, or hashless); one line says which."""


def _unique_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def content_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Hex sha256 over every tensor (in name order: name, dtype, shape, raw bytes) and every
    metadata entry except the hash itself: what a checkpoint's ``sha256`` field must equal."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)
    for key in sorted(k for k in metadata if k != HASH_KEY):
        h.update(f"{key}={metadata[key]}\n".encode())
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync ``path``, a file or a directory (to persist a rename in it); a no-op where it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` atomically (temp file, fsync, rename): a crash leaves the old checkpoint or
    the new one, never half of one (nor, after a power cut, a file of zeros). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in _unique_state(model).items()}
    opt_meta: dict[str, Any] = {}
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, per_param in state["state"].items():
            for name, value in per_param.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{name}"] = value.detach().contiguous()
        opt_meta = {"param_groups": state["param_groups"]}
    for name, value in (rng or {}).items():
        tensors[f"rng.{name}"] = value.contiguous()
    metadata = {"meta": json.dumps(meta or {}), "optim": json.dumps(opt_meta)}
    metadata[HASH_KEY] = content_hash(tensors, metadata)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # the data reaches the disk before the rename can
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def _read_verified(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and every tensor of ``path``, after checking its hash; raises CheckpointCorrupt."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for torn headers and short files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointCorrupt(f"checkpoint {path} is corrupt: unreadable safetensors ({reason})") from e
    stored = metadata.get(HASH_KEY)
    if stored is None:
        raise CheckpointCorrupt(f"checkpoint {path} is corrupt: it carries no {HASH_KEY} (written by an older "
                                "version, or edited); delete it and train again")
    actual = content_hash(tensors, metadata)
    if actual != stored:
        raise CheckpointCorrupt(f"checkpoint {path} is corrupt: sha256 {actual[:12]}... does not match "
                                f"the stored {stored[:12]}...")
    return metadata, tensors


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (iteration, configs), without reading its tensors (so
    without checking its hash: ``load_checkpoint`` does that). Raises CheckpointCorrupt on a torn header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointCorrupt(f"checkpoint {path} is corrupt: unreadable header ({reason})") from e


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore ``model`` (and ``optimizer``) from ``path``; returns (meta, rng states). The hash is
    checked before anything is restored: on CheckpointCorrupt the model and optimizer are untouched."""
    path = Path(path)
    metadata, tensors = _read_verified(path)
    weights: dict[str, torch.Tensor] = {}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    rng: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "model":
            weights[rest] = tensor
        elif kind == "optim":
            index, _, name = rest.partition(".")
            optim.setdefault(int(index), {})[name] = tensor
        elif kind == "rng":
            rng[rest] = tensor
    if model is not None:
        try:
            load_strict(model, weights)
        except ValueError as e:
            raise ValueError(f"checkpoint {path} does not fit the model: {e}") from None
    if optimizer is not None:
        groups = json.loads(metadata.get("optim", "{}")).get("param_groups")
        if groups is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict({"state": optim, "param_groups": groups})
    return json.loads(metadata.get("meta", "{}")), rng
