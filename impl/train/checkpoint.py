"""Checkpoints in safetensors, written atomically, with everything a bit-exact resume needs.

One file holds the model weights (``model.*``), the optimizer's per-parameter state
(``optim.<param index>.<name>``), and the RNG states (``rng.*`` as uint8 tensors); the JSON
metadata holds the iteration, the configs and the optimizer's scalar state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` atomically (temp file + rename): a crash never leaves half a checkpoint."""
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
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (iteration, configs), without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore ``model`` (and ``optimizer``) from ``path``; returns (meta, rng states)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    weights: dict[str, torch.Tensor] = {}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    rng: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            kind, _, rest = key.partition(".")
            if kind == "model":
                weights[rest] = f.get_tensor(key)
            elif kind == "optim":
                index, _, name = rest.partition(".")
                optim.setdefault(int(index), {})[name] = f.get_tensor(key)
            elif kind == "rng":
                rng[rest] = f.get_tensor(key)
    if model is not None:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")}
        if set(missing) - tied or unexpected:
            raise ValueError(
                f"checkpoint {path} does not fit the model: missing {sorted(set(missing) - tied)}, "
                f"unexpected {sorted(unexpected)}"
            )
    if optimizer is not None:
        groups = json.loads(metadata.get("optim", "{}")).get("param_groups")
        if groups is None:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        optimizer.load_state_dict({"state": optim, "param_groups": groups})
    return json.loads(metadata.get("meta", "{}")), rng
