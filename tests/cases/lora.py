"""Cases and properties for project 5: GPTs with adapters, model shapes, NF4 weights, broken adapter files."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.cases import Cases
from impl.gpt.model import GPT, GPTConfig
from reference import bnb_nf4
from tests.cases.gpt import random_gpt

ALL = ("c_attn", "c_proj", "c_fc")


def _adapter_shapes(config: dict[str, Any], rank: int, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Our adapter keys and shapes for ``targets`` of a GPT of shape ``config`` (from the model, not impl.lora)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets:
            shapes[f"{name}.lora_A"] = (rank, m.in_features)
            shapes[f"{name}.lora_B"] = (m.out_features, rank)
    return shapes


def adapter_case(seed: int, batch: int, length: int, n_layer: int, n_head: int, head_dim: int, rank: int,
                 alpha: float, targets: tuple[str, ...] = ALL, bias: bool = True, vocab_size: int = 50,
                 id: str | None = None) -> dict[str, Any]:
    """A random GPT, a random adapter (B non-zero, so the update is not the identity) and tokens."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, max(length, 8), bias)
    gen = torch.Generator().manual_seed(seed + 1)
    shapes = _adapter_shapes(config, rank, targets)
    adapter = {k: 0.2 * torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    idx = torch.randint(vocab_size, (batch, length), generator=gen)
    case = {"config": config, "state": state, "adapter": adapter, "idx": idx, "rank": rank, "alpha": alpha,
            "targets": targets}
    return case | ({"id": id} if id else {})


adapters = Cases(
    edge=[
        adapter_case(0, 1, 2, 1, 1, 4, 1, 1.0, id="rank-1-one-layer"),
        adapter_case(1, 2, 12, 2, 2, 8, 4, 8.0, id="rank-4-alpha-8"),
        adapter_case(2, 1, 9, 2, 4, 4, 8, 16.0, targets=("c_attn",), id="attention-only"),
        adapter_case(3, 2, 7, 2, 2, 8, 3, 5.0, targets=("c_fc",), bias=False, id="mlp-only-no-bias"),
        adapter_case(4, 1, 16, 3, 2, 16, 16, 32.0, id="rank-above-some-widths"),
    ],
    strategy=st.builds(
        adapter_case,
        seed=st.integers(0, 2**16), batch=st.integers(1, 2), length=st.integers(2, 16),
        n_layer=st.integers(1, 2), n_head=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4, 8]),
        rank=st.integers(1, 8), alpha=st.floats(0.5, 64.0),
        targets=st.sampled_from([ALL, ("c_attn",), ("c_proj",), ("c_fc", "c_proj")]),
        bias=st.booleans(),
    ),
)


def shape_case(n_layer: int, n_head: int, n_embd: int, vocab_size: int, rank: int, targets: tuple[str, ...],
               tie: bool = True, id: str | None = None) -> dict[str, Any]:
    config = {"vocab_size": vocab_size, "block_size": 64, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
              "bias": False, "tie_embeddings": tie}
    case = {"config": config, "rank": rank, "targets": targets}
    return case | ({"id": id} if id else {})


shapes = Cases(
    edge=[
        shape_case(32, 32, 4096, 32000, 8, ALL, id="llama-7b-shaped-rank-8"),
        shape_case(1, 1, 8, 10, 1, ("c_attn",), id="tiny"),
        shape_case(2, 2, 16, 20, 4, ALL, tie=False, id="untied-head"),
    ],
    strategy=st.builds(
        shape_case, n_layer=st.integers(1, 4), n_head=st.sampled_from([1, 2, 4]),
        n_embd=st.sampled_from([8, 16, 64]), vocab_size=st.integers(2, 100), rank=st.integers(1, 16),
        targets=st.sampled_from([ALL, ("c_attn",), ("c_fc", "c_proj")]), tie=st.booleans(),
    ),
)


def nf4_case(seed: int, rows: int, cols: int, double_quant: bool, scale: float = 1.0, zero_rows: int = 0,
             id: str | None = None) -> dict[str, Any]:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    weight[:zero_rows] = 0.0  # whole blocks of zeros: absmax 0
    case = {"weight": weight, "double_quant": double_quant}
    return case | ({"id": id} if id else {})


nf4_weights = Cases(
    edge=[
        nf4_case(0, 64, 64, False, id="one-scale-per-row"),
        nf4_case(1, 128, 96, True, id="double-quant"),
        nf4_case(2, 7, 9, True, id="odd-count-partial-block"),
        nf4_case(3, 3, 50, False, id="remainder-block-plain"),
        nf4_case(4, 64, 512, True, scale=30.0, zero_rows=2, id="zero-blocks-and-large-values"),
        nf4_case(5, 300, 256, True, scale=0.02, id="more-than-256-scales"),
    ],
    strategy=st.builds(nf4_case, seed=st.integers(0, 2**16), rows=st.integers(1, 80), cols=st.integers(1, 300),
                       double_quant=st.booleans(), scale=st.floats(1e-3, 1e3)),
)


def matches_bitsandbytes_nf4(fn: Callable, weight: torch.Tensor, double_quant: bool) -> None:
    """Property: ``fn(weight, double_quant)`` gives bitsandbytes' packed NF4 codes (a code may differ
    only for a value within 1e-6 of the midpoint between two levels: the tables differ in the last bit),
    scales that are the exact block absmax (plain) or within half an int8 step of it (double-quantized:
    step = the largest |absmax - mean| of the 256-block over 127), and dequantized weights equal to
    bitsandbytes' up to the difference of the two sides' scales (|level| x |scale_ours - scale_bnb|)
    plus 2^-21 of the scale (the tables' last bit)."""
    ours, theirs = fn(weight, double_quant), bnb_nf4.quantize_dequantize(weight, double_quant)
    n = weight.numel()
    flat = torch.nn.functional.pad(weight.reshape(-1).float(), (0, -n % 64)).view(-1, 64)
    absmax = flat.abs().amax(dim=1)
    assert ours["codes"].shape == theirs["codes"].shape, f"codes {tuple(ours['codes'].shape)} vs bnb's " \
        f"{tuple(theirs['codes'].shape)}"
    table = bnb_nf4.code_values()
    ours_codes = torch.stack([ours["codes"] >> 4, ours["codes"] & 15], 1).reshape(-1)[:n].long()
    bnb_codes = torch.stack([theirs["codes"] >> 4, theirs["codes"] & 15], 1).reshape(-1)[:n].long()
    differ = ours_codes != bnb_codes
    if differ.any():
        normalized = (flat / absmax.clamp(min=1e-38)[:, None]).reshape(-1)[:n][differ]
        midpoints = (table[1:] + table[:-1]) / 2
        gap = (normalized[:, None] - midpoints[None]).abs().min(dim=1).values
        assert (gap < 1e-6).all() and ((ours_codes - bnb_codes)[differ].abs() == 1).all(), \
            f"{int(differ.sum())} of {n} codes differ from bitsandbytes' (not at a tie)"
    scales = ours["scales"]
    assert scales.shape == absmax.shape, f"scales {tuple(scales.shape)}, expected {tuple(absmax.shape)}"
    if double_quant:
        centered = torch.nn.functional.pad(absmax - absmax.mean(), (0, -absmax.numel() % 256)).view(-1, 256)
        half_step = (centered.abs().amax(dim=1) / 254).repeat_interleave(256)[: absmax.numel()]
        err = (scales - absmax).abs()
        assert (err <= half_step * (1 + 1e-5) + 1e-30).all(), \
            f"a scale is off by {float((err - half_step).max()):.3g} more than half an int8 step"
    else:
        assert torch.equal(scales, absmax), "plain scales are not the block absmax"
    bound = (table[bnb_codes].abs().view(-1) * (scales - theirs["scales"]).abs().repeat_interleave(64)[:n]
             + 2.0**-21 * torch.maximum(scales, theirs["scales"]).repeat_interleave(64)[:n])
    err = (ours["weight"].reshape(-1) - theirs["weight"].reshape(-1)).abs()
    assert (err <= bound + 1e-30).all(), f"dequantized weight off bitsandbytes' by {float((err - bound).max()):.3g} " \
        "beyond the scales' difference"


def broken_case(breakage: str, seed: int = 0, rank: int = 2, id: str | None = None) -> dict[str, Any]:
    config, state = random_gpt(seed, 2, 2, 4, 20, 8)
    return {"config": config, "state": state, "rank": rank, "breakage": breakage} | ({"id": id} if id else {})


adapter_files = Cases(edge=[broken_case(b, id=b) for b in ("intact", "missing", "unexpected", "shape")])


def strict_adapter_loading(fn: Callable, config: dict[str, Any], state: dict[str, torch.Tensor], rank: int,
                           breakage: str) -> None:
    """Property: ``fn(model, path)`` (a model wrapped with LoRA on every linear) loads an intact adapter
    file exactly, and refuses one with a key removed, a key added or a tensor of the wrong shape with a
    ValueError naming that key."""
    from impl.lora.fast import adapter_state, apply_lora, save_adapter

    source = GPT.from_state(config, state)
    apply_lora(source, ALL, rank, 2 * rank, seed=1)
    with torch.no_grad():
        for t in adapter_state(source).values():
            t.normal_()
    target = GPT.from_state(config, state)
    apply_lora(target, ALL, rank, 2 * rank, seed=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(source, Path(tmp) / "adapter.safetensors")
        tensors = load_file(str(path))
        victim = sorted(tensors)[1]
        if breakage == "missing":
            del tensors[victim]
        elif breakage == "unexpected":
            victim = "blocks.9.mlp.c_fc.lora_A"
            tensors[victim] = torch.zeros(rank, 4)
        elif breakage == "shape":
            tensors[victim] = torch.zeros(tensors[victim].shape[0] + 1, tensors[victim].shape[1])
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        save_file(tensors, str(path), metadata=metadata)
        if breakage == "intact":
            fn(target, path)
            for key, value in adapter_state(target).items():
                assert torch.equal(value, adapter_state(source)[key]), f"{key} not loaded exactly"
            return
        try:
            fn(target, path)
        except ValueError as e:
            assert victim in str(e), f"the error does not name {victim}: {e}"
            return
        raise AssertionError(f"an adapter file with a {breakage} key ({victim}) loaded without an error")
