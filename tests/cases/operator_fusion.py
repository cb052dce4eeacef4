"""Cases for project 25 (operator fusion): odd shapes against the kernels' blocks, rows that need
LayerNorm's epsilon, scores that need the softmax's max subtraction, and small GPTs.

Row lengths C are chosen against the power-of-two row blocks of the Triton kernels and the
1024-element blocks of the elementwise ones: 1, 7, 100, 257, 1000 (none a power of two), a single
row, leading dims of any rank. "small" rows (entries ~1e-3, variance ~1e-6) make eps = 1e-5 the
larger term under the square root, so a LayerNorm without it is far off; "constant" rows have a
variance of exactly 0 (without eps: 0 / 0). Scores up to ~200 overflow exp() without the max
subtraction. Softmax cases with T < S (a chunk of queries after a cache) tell a bottom-right causal
mask from a top-left one. Shapes stay small: the Triton kernels run in the CPU interpreter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from hypothesis import strategies as st

from harness.cases import Cases
from impl.gpt.model import GPT, GPTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_LENGTHS = [1, 2, 7, 31, 64, 100, 129, 256, 257, 1000]
LEADING = [(1,), (3,), (17,), (2, 5), (1, 1, 4)]


def _values(gen: torch.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    if kind == "small":
        return 1e-3 * x  # variance ~1e-6 < eps
    if kind == "constant":
        return torch.full(shape, 0.375)  # exactly representable: variance exactly 0
    if kind == "large":
        return 8 * x  # |u| up to ~30: tanh saturates
    return x


def rows_case(seed: int, leading: tuple[int, ...], C: int, kind: str = "normal", grad: bool = False,
              dtype: torch.dtype | None = None, id: str | None = None) -> dict:
    """x (*leading, C) of ``kind`` with the operands every row op may take: bias, weight, residual
    (C,) / (*leading, C), eps; plus upstream gradients dy, ds when ``grad``. Consumers pick theirs."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*leading, C)
    case = {
        "x": _values(gen, shape, kind),
        "residual": _values(gen, shape, kind),
        "weight": 1 + 0.5 * torch.randn(C, generator=gen),
        "bias": 0.5 * torch.randn(C, generator=gen),
    }
    if grad:
        case["dy"] = torch.randn(shape, generator=gen)
        case["ds"] = torch.randn(shape, generator=gen)
    if dtype is not None:
        case["dtype"] = dtype
    return case | ({"id": id} if id else {})


def _only(keys: tuple[str, ...], case: dict) -> dict:
    return {k: v for k, v in case.items() if k in keys + ("id", "dtype")}


# (id, seed, leading, C, kind)
ROW_EDGES = [
    ("one-row-c1024", 0, (1,), 1024, "normal"),
    ("c257-3-rows", 1, (3,), 257, "normal"),
    ("c7-rank3", 2, (2, 5), 7, "normal"),
    ("c1-single-element-rows", 3, (4,), 1, "normal"),
    ("c1000-small-rows", 4, (5,), 1000, "small"),
    ("c256-small-rows", 5, (9,), 256, "small"),
    ("c100-constant-rows", 6, (3,), 100, "constant"),
    ("c129-large-values", 7, (6,), 129, "large"),
    # 70 rows: the LayerNorm backward splits them over 3 programs (32 rows each) whose dweight / dbias
    # partial sums must all be added; every other case fits one program
    ("c100-70-rows", 8, (70,), 100, "normal"),
]


def _row_edges(keys: tuple[str, ...], grad: bool, dtypes: dict[str, torch.dtype], eps: bool) -> list[dict]:
    out = []
    for name, dtype in dtypes.items():
        for sid, seed, leading, C, kind in ROW_EDGES:
            case = _only(keys, rows_case(seed, leading, C, kind, grad, dtype, id=f"{sid}-{name}"))
            out.append(case | ({"eps": 1e-5} if eps else {}))
    return out


def _row_strategy(keys: tuple[str, ...], grad: bool, dtypes: dict[str, torch.dtype], eps: bool) -> st.SearchStrategy:
    case = st.builds(rows_case, seed=st.integers(0, 2**16), leading=st.sampled_from(LEADING),
                     C=st.sampled_from(ROW_LENGTHS), kind=st.sampled_from(["normal", "small", "large"]),
                     grad=st.just(grad), dtype=st.sampled_from(list(dtypes.values())))
    return case.map(lambda c: _only(keys, c) | ({"eps": 1e-5} if eps else {}))


def row_cases(keys: tuple[str, ...], grad: bool = False, low_precision: bool = True, eps: bool = True) -> Cases:
    """Cases for an op taking ``keys`` of ``rows_case`` (fp32 and, with ``low_precision``, bf16)."""
    dtypes = DTYPES if low_precision else {"fp32": torch.float32}
    return Cases(edge=_row_edges(keys, grad, dtypes, eps), strategy=_row_strategy(keys, grad, dtypes, eps))


BIAS_GELU = ("x", "bias")
LAYER_NORM = ("x", "weight", "bias")
ADD_LAYER_NORM = ("x", "residual", "weight", "bias")

bias_gelu = row_cases(BIAS_GELU, eps=False)
bias_gelu_fp32 = row_cases(BIAS_GELU, low_precision=False, eps=False)
bias_gelu_grads = row_cases(BIAS_GELU + ("dy",), grad=True, low_precision=False, eps=False)
layer_norm = row_cases(LAYER_NORM)
layer_norm_fp32 = row_cases(LAYER_NORM, low_precision=False)
layer_norm_grads = row_cases(LAYER_NORM + ("dy",), grad=True, low_precision=False)
add_layer_norm = row_cases(ADD_LAYER_NORM)
add_layer_norm_fp32 = row_cases(ADD_LAYER_NORM, low_precision=False)
add_layer_norm_grads = row_cases(ADD_LAYER_NORM + ("ds", "dy"), grad=True, low_precision=False)


# ------------------------------------------------------------------ attention's softmax


def scores_case(seed: int, B: int, nh: int, T: int, S: int, causal: bool, scale: float, magnitude: float = 1.0,
                grad: bool = False) -> dict:
    """Scores (B, nh, T, S) of ``magnitude``, the softmax scale and mask flag, dy when ``grad``."""
    gen = torch.Generator().manual_seed(seed)
    case = {"scores": magnitude * torch.randn(B, nh, T, S, generator=gen), "scale": scale, "causal": causal}
    if grad:
        case["dy"] = torch.randn(B, nh, T, S, generator=gen)
    return case


# (id, B, nh, T, S, causal, scale, magnitude)
SCORE_EDGES = [
    ("t1-s1", 1, 1, 1, 1, True, 0.125, 1.0),
    ("t70-causal-hs64", 1, 2, 70, 70, True, 0.125, 4.0),
    ("cache-37x239-causal", 1, 2, 37, 239, True, 1 / math.sqrt(40), 3.0),
    ("decode-1x100-causal", 2, 1, 1, 100, True, 0.25, 2.0),
    ("t5x300-not-causal", 1, 3, 5, 300, False, 0.5, 1.0),
    ("scores-200-overflow-exp", 1, 1, 9, 33, True, 1.0, 200.0),
]


def _score_edges(grad: bool, dtypes: dict[str, torch.dtype]) -> list[dict]:
    return [{"id": f"{sid}-{name}", "dtype": dtype, **scores_case(i, B, nh, T, S, causal, scale, mag, grad)}
            for name, dtype in dtypes.items()
            for i, (sid, B, nh, T, S, causal, scale, mag) in enumerate(SCORE_EDGES)]


@st.composite
def _scores(draw: st.DrawFn, grad: bool, dtypes: dict[str, torch.dtype]) -> dict:
    T = draw(st.integers(1, 40))
    S = draw(st.sampled_from([T, draw(st.integers(T, 150))]))
    case = scores_case(draw(st.integers(0, 2**16)), draw(st.integers(1, 2)), draw(st.integers(1, 2)), T, S,
                       draw(st.booleans()), draw(st.sampled_from([1.0, 0.125, 1 / math.sqrt(40)])),
                       draw(st.sampled_from([1.0, 5.0, 50.0])), grad)
    return {"dtype": draw(st.sampled_from(list(dtypes.values()))), **case}


softmax = Cases(edge=_score_edges(False, DTYPES), strategy=_scores(False, DTYPES))
softmax_grads = Cases(edge=_score_edges(True, {"fp32": torch.float32}),
                      strategy=_scores(True, {"fp32": torch.float32}))


# ------------------------------------------------------------------ the fused GPT


def gpt_case(seq_len: int, n_head: int, n_embd: int, bias: bool = True, batch: int = 2, seed: int = 0) -> dict:
    """A small GPT's shape and a batch of token ids' size for ``same_logits_as_eager``."""
    return {"seq_len": seq_len, "n_head": n_head, "n_embd": n_embd, "bias": bias, "batch": batch, "seed": seed}


def same_logits_as_eager(fn: Callable[[GPT, torch.Tensor], torch.Tensor], seq_len: int, n_head: int, n_embd: int,
                         bias: bool, batch: int, seed: int) -> None:
    """Property: ``fn(model, idx)`` (a fused / traced / compiled run of ``model``) gives the eager model's
    logits for ``idx`` within fp32 tolerance (rtol = atol = 1e-5), and leaves the model's own logits as they were."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=n_head, n_embd=n_embd, bias=bias)).eval()
    with torch.no_grad():  # trained-looking LayerNorms: not all ones and zeros
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            if name.endswith("c_fc.weight"):  # pre-GELU activations of order 1, where GELU's two forms differ
                p.mul_(15)
    idx = torch.randint(0, 61, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(idx)
        logits = fn(model, idx)
        again = model(idx)
    assert logits.shape == ref.shape, f"logits of shape {tuple(logits.shape)}, eager's are {tuple(ref.shape)}"
    err = (logits.double() - ref.double()).abs().max().item()
    assert math.isfinite(err) and torch.allclose(logits, ref, rtol=1e-5, atol=1e-5), \
        f"logits differ from the eager model's by up to {err:.3g}"
    assert torch.equal(again, ref), "running the fused version changed the eager model"


gpt = Cases(
    edge=[
        {"id": "seq1", **gpt_case(1, 2, 32)},
        {"id": "seq37-c40", **gpt_case(37, 2, 40)},
        {"id": "seq64-c48-no-bias", **gpt_case(64, 4, 48, bias=False)},
    ],
    strategy=st.builds(gpt_case, seq_len=st.integers(1, 64), n_head=st.sampled_from([1, 2]),
                       n_embd=st.sampled_from([16, 24, 40]), bias=st.booleans(), batch=st.integers(1, 3),
                       seed=st.integers(0, 2**16)),
)

# the Triton kernels run in the CPU interpreter (one Python call per program): shorter sequences
gpt_interpreted = Cases(
    edge=[
        {"id": "seq1", **gpt_case(1, 2, 32)},
        {"id": "seq19-c40", **gpt_case(19, 2, 40)},
        {"id": "seq24-c48-no-bias", **gpt_case(24, 4, 48, bias=False, batch=1)},
    ],
    strategy=st.builds(gpt_case, seq_len=st.integers(1, 24), n_head=st.sampled_from([1, 2]),
                       n_embd=st.sampled_from([16, 24, 40]), bias=st.booleans(), batch=st.integers(1, 2),
                       seed=st.integers(0, 2**16)),
)
