"""Unit tests of project 9 beyond its spec checks: the GPT backends, any tile size, the causal
work saving, finite-difference gradients, the errors users see, and that the Triton kernels
compile for a GPU (the interpreter runs them but never compiles them).

(The Triton kernels accumulate in float32 whatever the input dtype, so a float64 finite-difference
gradcheck cannot resolve them; their gradients are checked against autograd in the spec.)

The spec checks (tests/test_specs.py, ``-k flash_attention``) pin outputs, LSE and gradients of
the tiled and Triton versions to the textbook on odd shapes in fp32 and bf16, with mutants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import impl.flash_attention  # noqa: F401  (registers the "flash" and "flash_triton" backends)
from impl.flash_attention import fast
from impl.flash_attention.naive import attention_with_lse, grads_of
from impl.gpt.attention import get_attention, naive_attention
from impl.gpt.model import GPT, GPTConfig
from tests.cases.flash_attention import attention_case


def _gpt_pair(attention: str, seq_len: int = 40) -> tuple[GPT, GPT]:
    """Two GPTs with the same weights: one on SDPA, one on ``attention``."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=seq_len, n_layer=2, n_head=2, n_embd=32)
    ref = GPT(config)
    other = GPT(GPTConfig(**{**config.to_dict(), "attention": attention}))
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("backend", ["flash", "flash_triton"])
def test_gpt_config_with_flash_backend_gives_sdpa_logits(backend):
    ref, model = _gpt_pair(backend)
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(idx), ref(idx), rtol=1e-5, atol=1e-5)


def test_flash_backend_is_the_tiled_autograd_function():
    assert get_attention("flash") is fast.flash_attention


def test_gpt_trains_with_flash_backend_like_with_sdpa():
    ref, model = _gpt_pair("flash")
    idx = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(2))
    for m in (ref, model):
        m.zero_grad()
        m(idx).logsumexp(-1).mean().backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 40),
    extra=st.integers(0, 30),
    block_q=st.integers(4, 48),
    block_k=st.integers(4, 48),
    causal=st.booleans(),
)
@example(T=5, extra=3, block_q=1, block_k=1, causal=True)  # one-element tiles
@example(T=7, extra=0, block_q=7, block_k=2, causal=True)
def test_tiled_attention_is_exact_for_any_tile_size(T, extra, block_q, block_k, causal):
    case = attention_case(1, 2, T, T + extra, 24, causal, seed=T * 31 + extra, grad=True)
    q, k, v, dy = (case[n].double() for n in ("q", "k", "v", "dy"))
    o, lse = fast.flash_forward(q, k, v, causal, block_q=block_q, block_k=block_k)
    o_ref, lse_ref = attention_with_lse(q, k, v, causal)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    grads = fast.flash_backward(q, k, v, o, lse, dy, causal, block_q=block_q, block_k=block_k)
    for g, g_ref in zip(grads, grads_of(naive_attention, q, k, v, causal, dy), strict=True):
        torch.testing.assert_close(g, g_ref)


def test_causal_tiles_above_the_diagonal_are_never_visited():
    # T = S = 512, tiles of 128: query block i visits key blocks 0..i, 10 of the 16 tiles
    visited = sum(len(fast.key_block_starts(q0, q0 + 128, 512, 512, True, 128)) for q0 in range(0, 512, 128))
    assert visited == 1 + 2 + 3 + 4
    # after a cache of 100 keys, the first query block also sees the block holding keys 100..127
    assert list(fast.key_block_starts(0, 128, 128, 228, True, 128)) == [0, 128]


def test_tiled_backward_matches_finite_differences():
    case = attention_case(1, 1, 5, 9, 16, True, seed=3)
    inputs = tuple(case[n].double().requires_grad_() for n in ("q", "k", "v"))
    assert torch.autograd.gradcheck(lambda q, k, v: fast.flash_attention(q, k, v, True), inputs)


def test_triton_kernel_takes_strided_inputs_like_the_gpt_passes_them():
    from impl.flash_attention.triton import flash_attention_triton

    x = torch.randn(2, 50, 3 * 2 * 16)  # (B, T, 3C): q, k, v split from one projection, as in the GPT
    q, k, v = (t.view(2, 50, 2, 16).transpose(1, 2) for t in x.split(32, dim=2))  # non-contiguous
    torch.testing.assert_close(flash_attention_triton(q, k, v, True), naive_attention(q, k, v, True))


def test_triton_kernel_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    from impl.flash_attention import triton as flash_triton

    monkeypatch.setattr(flash_triton, "INTERPRET", False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        flash_triton.flash_attention_triton(q, q, q, True)


def test_triton_kernel_refuses_head_dims_below_16():
    from impl.flash_attention.triton import flash_attention_triton

    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="head dims 16..256"):
        flash_attention_triton(q, q, q, True)


_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for module, kernel, signature, constexprs in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(module), kernel)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
"""


def compile_for_h100(jobs: list[tuple[str, str, dict, dict]]) -> None:
    """Compile each (module, kernel, signature, constexprs) to an sm_90 cubin in a fresh process.

    No GPU is needed (triton ships ptxas); TRITON_INTERPRET must be unset there, or the kernels
    would be interpreter objects. Catches what the interpreter cannot: type errors of the
    compiled language, and kernels that do not fit the GPU's shared memory.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, f"kernel compilation failed:\n{proc.stderr[-3000:]}"


def test_flash_attention_kernels_compile_for_an_h100():
    # bf16 only: the float32 (IEEE dot) variants compile too, but take ~40 s cold
    p, module = "*bf16", "impl.flash_attention.triton"
    consts = {"CAUSAL": True, "HEAD_DIM": 80, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 128,
              "UPCAST": False, "PRECISION": "tf32"}
    lengths = {"T": "i32", "S": "i32", "kv_offset": "i32"}
    grads_in = {"Q": p, "K": p, "V": p, "DO": p, "LSE": "*fp32", "DELTA": "*fp32"}
    grads_in.update(lengths, sm_scale="fp32")
    compile_for_h100([
        (module, "_flash_fwd_kernel",
         {"Q": p, "K": p, "V": p, "Out": p, "LSE": "*fp32", **lengths, "qk_scale": "fp32"}, consts),
        (module, "_flash_bwd_dkdv_kernel", {**grads_in, "DK": p, "DV": p}, consts),
        (module, "_flash_bwd_dq_kernel", {**grads_in, "DQ": p}, consts),
    ])  # fmt: skip
