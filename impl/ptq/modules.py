"""Quantized layers that replace a GPT's ``nn.Linear`` modules by name, and quantized models on disk.

    from impl.ptq.modules import quantize_model, model_nbytes
    from impl.ptq.quant import Scheme
    quantize_model(model, Scheme(bits=4, group_size=128))          # RTN, the tied head left in fp32
    quantize_model(model, Scheme(8), lm_head=True)                  # the tied head/embedding too
    quantize_model(model, scheme, weights=gptq_model(...))          # codes someone else computed (GPTQ, QAT)

A ``QuantLinear`` holds integer codes (int8/uint8 (out, in), or two 4-bit codes per byte (out, ceil(in/2))
for 2..4 bits), fp32 scales per output channel or group, integer zero points when asymmetric, and an fp32
bias; its forward dequantizes the weight on the fly (the weight in full precision exists only during the
call). An int8 per-channel symmetric layer can instead run W8A8: activations quantized per token on the
fly, ``torch._int_mm`` (int8 x int8 -> int32), one rescale.

The tied embedding/LM head is one tensor in fp32; quantizing the head (``lm_head=True``) keeps it one:
the embedding becomes a ``QuantEmbedding`` that reads rows of the head's codes and dequantizes only them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.ptq.quant import Scheme, dequantize, pack_int4, qparams, quantize, unpack_int4

TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer of a GPT block
HEAD = "lm_head"


def _packed(scheme: Scheme) -> bool:
    return scheme.bits <= 4


class QuantLinear(nn.Module):
    """A frozen linear layer with integer weight codes (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.int8_matmul = False
        width = (in_features + 1) // 2 if _packed(scheme) else in_features
        storage = torch.uint8 if _packed(scheme) else scheme.storage
        n_groups = scheme.groups(in_features)
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=storage))
        self.register_buffer("scale", torch.ones(out_features, n_groups))
        # symmetric grids have zero point 0: nothing to store; asymmetric ones store it as a code (uint8)
        self.register_buffer("zero", None if scheme.symmetric else torch.zeros(out_features, n_groups,
                                                                               dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                   bias: torch.Tensor | None = None) -> QuantLinear:
        """A layer holding codes ``q`` (out, in) with ``scale``/``zero`` (out, n_groups) under ``scheme``."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, scheme, bias is not None)
        if scale.shape != layer.scale.shape:
            raise ValueError(f"scale has shape {tuple(scale.shape)}, {scheme.label()} on a ({out_features}, "
                             f"{in_features}) weight needs {tuple(layer.scale.shape)}")
        if int(q.min()) < scheme.qmin or int(q.max()) > scheme.qmax:
            raise ValueError(f"codes span {int(q.min())}..{int(q.max())}, outside {scheme.label()}'s "
                             f"{scheme.qmin}..{scheme.qmax}")
        q = q.to(scheme.storage)
        layer.qweight.copy_(pack_int4(q) if _packed(scheme) else q)
        layer.scale.copy_(scale.float())
        if not scheme.symmetric:
            layer.zero.copy_(zero.round().to(torch.uint8))
        elif zero.abs().max() > 0:
            raise ValueError("a symmetric scheme has zero points 0")
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> QuantLinear:
        """Round-to-nearest: each group's own range sets its scale."""
        w = linear.weight.detach().float()
        scale, zero = qparams(w, scheme)
        return cls.from_codes(quantize(w, scale, zero, scheme), scale, zero, scheme, linear.bias)

    def codes(self) -> torch.Tensor:
        """The unpacked codes (out, in)."""
        if _packed(self.scheme):
            return unpack_int4(self.qweight, self.in_features, self.scheme.symmetric)
        return self.qweight

    def zeros(self) -> torch.Tensor:
        """Zero points (out, n_groups) fp32 (0 for a symmetric grid)."""
        return torch.zeros_like(self.scale) if self.zero is None else self.zero.float()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) the codes stand for."""
        return dequantize(self.codes(), self.scale, self.zeros(), self.scheme, dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows ``index`` (any shape) -> (*index.shape, in): an embedding lookup."""
        q = self.qweight[index]
        if _packed(self.scheme):
            q = unpack_int4(q, self.in_features, self.scheme.symmetric)
        zero = torch.zeros_like(self.scale[index]) if self.zero is None else self.zero[index].float()
        return dequantize(q, self.scale[index], zero, self.scheme, dtype)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        """int8 activations (per-token symmetric scale) x int8 weights, int32 accumulation, one rescale."""
        x2 = x.reshape(-1, self.in_features).float()
        x_scale = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).eps)
        xq = torch.round(x2 / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.qweight.t())  # (N, out) int32
        y = acc.float() * x_scale * self.scale[:, 0]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_matmul:
            return self._w8a8(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def use_int8_matmul(self, on: bool = True) -> None:
        """Run W8A8 (``torch._int_mm``); only an int8 per-channel symmetric layer can."""
        s = self.scheme
        if on and not (s.bits == 8 and s.symmetric and s.group_size is None):
            raise ValueError(f"int8 matmul needs int8 per-channel symmetric weights, this layer is {s.label()}")
        self.int8_matmul = on

    def nbytes(self) -> int:
        """Bytes this layer stores: codes, scales, zero points, bias."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.label()}, "
                f"bias={self.bias is not None}{', int8 matmul' if self.int8_matmul else ''}")


class QuantEmbedding(nn.Module):
    """The token embedding of a model whose tied LM head is a ``QuantLinear``: rows of the head's codes,
    dequantized per lookup. It holds no tensor of its own (the head owns them), so it stays tied."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: the head's buffers belong to lm_head alone

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head.rows(idx)


def linear_names(model: nn.Module, targets: Iterable[str] = TARGETS, lm_head: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` modules ``quantize_model`` replaces, in module order; a pattern that
    matches nothing is an error."""
    targets = tuple(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if lm_head:
        if not isinstance(getattr(model, HEAD, None), nn.Linear):
            raise ValueError(f"lm_head=True: the model has no nn.Linear named {HEAD!r}")
        names.append(HEAD)
    if not names:
        raise ValueError(f"no nn.Linear named {list(targets)} in the model")
    return names


def _tied(model: nn.Module) -> bool:
    wte, head = getattr(model, "wte", None), getattr(model, HEAD, None)
    return wte is not None and head is not None and wte.weight is head.weight


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` (dotted) of ``model`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, scheme: Scheme, targets: Iterable[str] = TARGETS, lm_head: bool = False,
                   weights: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None) -> list[str]:
    """Replace the linear layers named by ``targets`` (and the LM head when ``lm_head``) by ``QuantLinear``
    layers, in place, one at a time; ``weights`` gives precomputed ``(q, scale, zero)`` for some names (the
    rest are rounded to nearest). A tied embedding follows a quantized head. Returns the names replaced."""
    names = linear_names(model, targets, lm_head)
    unknown = sorted(set(weights or {}) - set(names))
    if unknown:
        raise ValueError(f"weights for {unknown}, which quantize_model does not replace (it replaces {names})")
    tied = _tied(model)
    for name in names:
        linear = model.get_submodule(name)
        if weights and name in weights:
            q, scale, zero = weights[name]
            layer = QuantLinear.from_codes(q, scale, zero, scheme, linear.bias)
        else:
            layer = QuantLinear.from_linear(linear, scheme)
        replace_module(model, name, layer.to(linear.weight.device))
        if name == HEAD and tied:
            model.wte = QuantEmbedding(layer)
    return names


def use_int8_matmul(model: nn.Module, on: bool = True) -> int:
    """Switch every ``QuantLinear`` of ``model`` to W8A8; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.use_int8_matmul(on)
    return len(layers)


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every unique parameter and buffer of ``model`` (a tied weight counted once)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


# ---------------------------------------------------------------- on disk

QUANT_KEY = "quantization"


def quantization_meta(scheme: Scheme, names: list[str], method: str, **extra: Any) -> dict[str, Any]:
    """What ``load_quantized`` needs to rebuild the layers (and what the file says it holds)."""
    return {"bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric,
            "names": names, "method": method, **extra}


def save_quantized(path: str | Path, model: nn.Module, meta: dict[str, Any], quantization: dict[str, Any]) -> Path:
    """Write a quantized model as a directory ``zoo.load_dir``-style (``model.safetensors``, hashed,
    atomic) with ``meta`` (a zoo model's metadata) plus ``quantization`` (``quantization_meta``)."""
    from impl.zoo import save_dir

    return save_dir(path, model, meta | {QUANT_KEY: quantization})


def load_quantized(path: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, meta)`` of a directory written by ``save_quantized``: the layers rebuilt
    empty from the metadata, then the codes loaded strictly (hash checked)."""
    from impl import model_cache
    from impl.train.checkpoint import load_checkpoint, read_meta
    from impl.zoo.recipes import tokenizer_from_metadata

    file = Path(path) / model_cache.MODEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no {model_cache.MODEL_FILE}: not a saved model directory")
    meta = read_meta(file)
    if QUANT_KEY not in meta:
        raise ValueError(f"{path} is not a quantized model (its metadata has no {QUANT_KEY!r}): use zoo.load_dir")
    spec = meta[QUANT_KEY]
    scheme = Scheme(spec["bits"], spec["group_size"], spec["symmetric"])
    model = model_cache.gpt_from_metadata(meta)
    tied = _tied(model)
    for name in spec["names"]:
        linear = model.get_submodule(name)
        layer = QuantLinear(linear.in_features, linear.out_features, scheme, linear.bias is not None)
        replace_module(model, name, layer)
        if name == HEAD and tied:
            model.wte = QuantEmbedding(layer)
    load_checkpoint(file, model)
    return model.eval(), tokenizer_from_metadata(meta), meta
