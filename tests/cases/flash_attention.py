"""Cases for project 9 (FlashAttention): odd shapes on purpose, both dtypes, and a GPT property.

Shapes are chosen against the tile sizes (128 in the PyTorch version, 64 in the Triton
kernel): sequence 1, lengths that leave ragged tails (113, 239), head dims that are not powers
of two (40, 80), and T != S (a chunk of queries after a KV cache, causal mask bottom-right).
They stay small because the Triton kernels run in the CPU interpreter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.gpt.model import GPT, GPTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (id, B, nh, T, S, hs, causal)
SHAPES = [
    ("seq1-hs16", 1, 2, 1, 1, 16, True),
    ("t113-hs40-causal", 2, 2, 113, 113, 40, True),
    ("t113-hs64", 1, 2, 113, 113, 64, False),
    ("t239-hs80", 1, 2, 239, 239, 80, False),
    ("t239-hs128-causal", 1, 2, 239, 239, 128, True),
    ("decode-1x239-hs64", 1, 2, 1, 239, 64, True),
    ("cache-37x239-hs16", 1, 2, 37, 239, 16, True),
    ("cache-113x239-hs80", 1, 1, 113, 239, 80, True),
]


def attention_case(
    B: int, nh: int, T: int, S: int, hs: int, causal: bool, seed: int = 0, peaked: bool = False,
    grad: bool = False,
) -> dict:
    """q (B, nh, T, hs), k, v (B, nh, S, hs) float32 from ``seed``, plus ``dy`` when ``grad``.

    ``peaked``: key norms grow along the sequence, so the row maximum keeps rising from one key
    tile to the next and any slip in the online-softmax rescaling shows.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, T, hs, generator=g)
    k = torch.randn(B, nh, S, hs, generator=g)
    v = torch.randn(B, nh, S, hs, generator=g)
    if peaked:
        q = 2 * q
        k = k * torch.linspace(0.5, 3.0, S).view(1, 1, S, 1)
    case = {"q": q, "k": k, "v": v, "causal": causal}
    if grad:
        case["dy"] = torch.randn(B, nh, T, hs, generator=g)
    return case


def _edge(grad: bool, shapes: list = SHAPES) -> list[dict]:
    cases = []
    for name, dtype in DTYPES.items():
        for i, (sid, B, nh, T, S, hs, causal) in enumerate(shapes):
            case = attention_case(B, nh, T, S, hs, causal, seed=i, grad=grad)
            cases.append({"id": f"{sid}-{name}", "dtype": dtype, **case})
        peaked = attention_case(1, 2, 150, 239, 64, True, seed=99, peaked=True, grad=grad)
        cases.append({"id": f"peaked-150x239-hs64-{name}", "dtype": dtype, **peaked})
    return cases


@st.composite
def _attention_cases(draw: st.DrawFn, grad: bool) -> dict:
    T = draw(st.integers(1, 70))
    S = draw(st.sampled_from([T, draw(st.integers(T, 140))]))
    case = attention_case(
        B=draw(st.integers(1, 2)),
        nh=draw(st.integers(1, 2)),
        T=T,
        S=S,
        hs=draw(st.sampled_from([16, 24, 40, 64, 72])),
        causal=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        peaked=draw(st.booleans()),
        grad=grad,
    )
    return {"dtype": draw(st.sampled_from(list(DTYPES.values()))), **case}


attention = Cases(edge=_edge(grad=False), strategy=_attention_cases(grad=False))
attention_grads = Cases(
    edge=_edge(grad=True, shapes=SHAPES[:3] + SHAPES[5:]), strategy=_attention_cases(grad=True)
)


def gpt_case(seq_len: int, n_head: int, n_embd: int, seed: int = 0) -> dict:
    """A GPT configuration and a batch of token ids for ``same_logits_as_sdpa_in_gpt``."""
    return {"seq_len": seq_len, "n_head": n_head, "n_embd": n_embd, "seed": seed}


def same_logits_as_sdpa_in_gpt(fn: Callable, seq_len: int, n_head: int, n_embd: int, seed: int) -> None:
    """Property: the shared GPT gives the same logits, and loss gradients, with ``fn`` as with SDPA."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50, block_size=seq_len, n_layer=2, n_head=n_head, n_embd=n_embd)
    model = GPT(config)  # attention="sdpa", the default
    idx = torch.randint(0, config.vocab_size, (2, seq_len))
    logits_ref = model(idx)
    grads_ref = torch.autograd.grad(logits_ref.square().mean(), model.parameters())
    for block in model.blocks:  # the attention seam: swap the backend, keep the weights
        block.attn.attend = fn
    logits = model(idx)
    grads = torch.autograd.grad(logits.square().mean(), model.parameters())
    err = (logits - logits_ref).abs().max().item()
    assert math.isfinite(err) and err <= 1e-5, f"logits differ from SDPA's by {err:.3g}"
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-6), "parameter gradients differ from SDPA's"


gpt = Cases(
    edge=[
        {"id": "seq1", **gpt_case(1, 2, 32)},
        {"id": "seq37-hs40", **gpt_case(37, 2, 80)},
        {"id": "seq200-hs16", **gpt_case(200, 4, 64)},
    ],
    strategy=st.builds(
        gpt_case,
        seq_len=st.integers(1, 130),
        n_head=st.sampled_from([1, 2, 4]),
        n_embd=st.sampled_from([64, 96]),
        seed=st.integers(0, 1000),
    ),
)
