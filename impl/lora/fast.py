"""LoRA for the shared GPT: wrap chosen linears, train only the adapters, merge, save, load.

``LoRALinear`` wraps a frozen base (an ``nn.Linear`` or an ``NF4Linear``: QLoRA) and adds
(alpha / r) B A x, A (r, in) kaiming-uniform, B (out, r) zero. Against ``naive.py``:
- the low-rank path runs as (x A^T) B^T, r (in + out) multiply-adds per token, never forming B A;
- ``merge()`` folds B A into W for inference: the adapter then costs nothing (and ``unmerge()``
  takes it back out to continue training);
- over a 4-bit base the adapter stays in fp32 while the base computes in the input's dtype.

``apply_lora`` freezes everything else, so a training loop that optimizes the parameters with
``requires_grad`` (``impl.train.loop.make_optimizer``) trains the adapters only.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.lora.nf4 import NF4Linear

TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear of every block of the shared GPT
_META_KEY = "lora"


class LoRALinear(nn.Module):
    """A frozen ``base`` linear plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        if isinstance(base, NF4Linear):
            device, dtype = base.packed.device, torch.float32  # adapters train in fp32 over a 4-bit base
        else:
            device, dtype = base.weight.device, base.weight.dtype
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # PEFT's default for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, (out, in): what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # (x A^T) B^T: the (out, in) product B A is never formed
        low_rank = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (low_rank * self.scale).to(y.dtype)

    def _refuse_nf4(self, what: str) -> None:
        if isinstance(self.base, NF4Linear):
            raise ValueError(f"cannot {what} a LoRA adapter into a 4-bit NF4 base: the sum is not representable "
                             "in NF4 without a new quantization error; dequantize the base first "
                             "(NF4Linear.dequantized()) into an nn.Linear, or keep the adapter separate")

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A; forward then runs the base alone. Refused over an NF4 base."""
        self._refuse_nf4("merge")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha / r) B A: undoes ``merge`` (up to float rounding)."""
        self._refuse_nf4("unmerge")
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # a pattern names a module (its last component, "c_fc") or a full dotted path ("blocks.0.mlp.c_fc")
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, targets: tuple[str, ...] | list[str] = TARGETS, rank: int = 8, alpha: float = 16,
               dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Wrap every linear (``nn.Linear`` or ``NF4Linear``) whose name matches ``targets`` in a
    ``LoRALinear``, in place, and freeze every other parameter. Returns the wrapped names.

    A pattern matches a module whose name is the pattern or ends with ``"." + pattern``. Patterns
    that match no linear are a ValueError naming them and some of the model's linears."""
    targets = tuple(targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))]
    names = [n for n in linears if _matches(n, targets)]
    unmatched = [t for t in targets if not any(_matches(n, (t,)) for n in linears)]
    if unmatched:
        raise ValueError(f"apply_lora: target patterns {unmatched} match no linear layer; the model's linears "
                         f"include {linears[:6]}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, dropout, generator))
    model._lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}  # saved with the adapter
    return names


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights once; an NF4 weight counts its (out x in)
    elements, as if it were not packed."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, sum(p.numel() for p in params) + packed


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors only: ``"<module>.lora_A"`` (r, in) and ``"<module>.lora_B"`` (out, r)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters alone to ``path`` (safetensors, atomically), with rank, alpha and targets
    as JSON in its metadata. Returns the path."""
    state = adapter_state(model)
    if not state:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    config = getattr(model, "_lora_config", None) or _config_of(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={_META_KEY: json.dumps(config)})
    os.replace(tmp, path)
    return path


def _config_of(model: nn.Module) -> dict[str, Any]:
    first = next(iter(lora_modules(model).values()))
    names = sorted({n.rpartition(".")[2] for n in lora_modules(model)})
    return {"rank": first.rank, "alpha": first.alpha, "targets": names}


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The rank, alpha and targets stored with an adapter file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path}: not a LoRA adapter file (no '{_META_KEY}' metadata)")
    return json.loads(meta[_META_KEY])


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load the adapters of ``path`` into ``model`` (wrapping its linears first, from the file's
    config, if it has no LoRA layers yet). Strict: a key missing from the file, a key the model has
    no place for, or a shape that differs is a ValueError naming each. Returns the keys loaded."""
    config = read_adapter_config(path)
    if not lora_modules(model):
        apply_lora(model, config["targets"], config["rank"], config["alpha"])
    for name, m in lora_modules(model).items():
        if m.rank != config["rank"] or m.alpha != config["alpha"]:
            raise ValueError(f"{path}: adapter has rank {config['rank']}, alpha {config['alpha']}; "
                             f"the model's {name} has rank {m.rank}, alpha {m.alpha}")
    expected = adapter_state(model)
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = sorted(f"{k}: file {tuple(stored[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in set(stored) & set(expected) if stored[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit the model's LoRA layers: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {shapes}")
    for key, target in expected.items():
        target.copy_(stored[key])
    return sorted(expected)


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put the plain base linear back in its place.
    Returns the names merged; an NF4 base is refused (see ``LoRALinear.merge``)."""
    names = list(lora_modules(model))
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lora = getattr(owner, child)
        lora.merge()
        setattr(owner, child, lora.base)
    return names


# The check adapters the spec calls: a GPT (config, state) with a given adapter, fp32 or fp64.

def _with_adapter(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                  rank: int, alpha: float, targets: tuple[str, ...]) -> GPT:
    model = GPT.from_state(config, state)
    apply_lora(model, targets, rank, alpha)
    with torch.no_grad():
        for key, value in adapter_state(model).items():
            value.copy_(adapter[key])
    return model


def lora_logits(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                idx: torch.Tensor, rank: int, alpha: float, targets: tuple[str, ...]) -> torch.Tensor:
    """Logits (B, T, vocab) of the GPT with ``LoRALinear`` adapters holding ``adapter``."""
    with torch.no_grad():
        return _with_adapter(config, state, adapter, rank, alpha, targets)(idx)


def merged_logits(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                  idx: torch.Tensor, rank: int, alpha: float, targets: tuple[str, ...]) -> torch.Tensor:
    """The same logits after ``merge_lora``: a plain GPT whose weights absorbed the adapters."""
    model = _with_adapter(config, state, adapter, rank, alpha, targets)
    merge_lora(model)
    with torch.no_grad():
        return model(idx)


def lora_logits_and_grads(config: dict[str, Any], state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                          idx: torch.Tensor, rank: int, alpha: float,
                          targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Logits and the gradient of the next-token loss on ``idx`` for every adapter tensor
    (keys ``"logits"`` and ``"grad:<module>.lora_A"`` ...)."""
    model = _with_adapter(config, state, adapter, rank, alpha, targets)
    logits = model(idx)
    lm_loss(logits[:, :-1], idx[:, 1:]).backward()
    grads = {f"grad:{name}.lora_{ab}": getattr(m, f"lora_{ab}").grad
             for name, m in lora_modules(model).items() for ab in "AB"}
    return {"logits": logits.detach(), **grads}


def trainable_count(config: dict[str, Any], rank: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(trainable, total) of a GPT of shape ``config`` on the meta device after ``apply_lora``."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    apply_lora(model, targets, rank, alpha=2 * rank)
    return trainable_parameters(model)

