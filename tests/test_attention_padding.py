"""Ragged batches (issue 8): every attention backend hides padding keys by one rule.

The rule is ``impl.gpt.attention.visibility``: query i of row b (absolute position S - T + i)
sees key j when the causal mask allows it and key j is valid, or j is its own position (a
padding query sees at least itself, so no softmax runs over nothing). ``naive_attention`` is the
reference for the dense backends; the sparse ones are checked against their own pattern as a
dense token mask with the same rule applied, since a sparse pattern differs from dense by design.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import impl.flash_attention  # noqa: F401  (registers "flash" and "flash_triton")
import impl.memory_efficient_attention  # noqa: F401  (registers "split_k")
import impl.sparse_attention  # noqa: F401  (registers "sparse_window")
import tests.mutants.gpt  # noqa: F401  (registers the mutant backends, "mutant_sees_padding" among them)
from impl.flash_attention import fast as flash
from impl.flash_attention.naive import attention_with_lse, grads_of
from impl.gpt.attention import get_attention, naive_attention, visibility
from impl.memory_efficient_attention import fast as mea
from impl.sparse_attention import fast as sparse_fast
from impl.sparse_attention import learned
from impl.sparse_attention import naive as sparse_naive
from impl.sparse_attention.patterns import build_layout, expand_layout, num_blocks, window_layout

# every backend that computes full (dense) attention; "flash_triton" with key_valid runs the tiled
# PyTorch path (its kernels take no padding mask), so it costs nothing in the interpreter here
DENSE_BACKENDS = ["naive", "sdpa", "flash", "flash_triton", "split_k"]
SPARSE_WINDOW = dict(block_size=16, window=2, n_global=1)  # what impl.sparse_attention registers
PAD_KINDS = ["left", "right", "holes", "none", "all"]
HYPOTHESIS = settings(max_examples=20, deadline=None, derandomize=True)


def key_valid_rows(kinds: list[str], S: int, seed: int) -> torch.Tensor:
    """bool (len(kinds), S): per row left padding, right padding, random holes, none, or all padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kind in kinds:
        n_pad = int(torch.randint(0, S + 1, (), generator=g))
        row = torch.ones(S, dtype=torch.bool)
        if kind == "left":
            row[:n_pad] = False
        elif kind == "right":
            row[S - n_pad :] = False
        elif kind == "holes":
            row = torch.rand(S, generator=g) < 0.6
        elif kind == "all":
            row[:] = False
        rows.append(row)
    return torch.stack(rows)


@st.composite
def ragged_cases(draw: st.DrawFn, self_attention: bool = False, max_T: int = 40) -> dict:
    """q (B, nh, T, hs), k, v (B, nh, S, hs) float32, key_valid (B, S), causal, dy; S == T or S > T."""
    T = draw(st.integers(1, max_T))
    S = T if self_attention else draw(st.sampled_from([T, T + draw(st.integers(1, 40))]))
    B = draw(st.integers(1, 3))
    kinds = [draw(st.sampled_from(PAD_KINDS)) for _ in range(B)]
    seed = draw(st.integers(0, 2**16))
    return make_case(B, draw(st.integers(1, 2)), T, S, 16, draw(st.booleans()), kinds, seed)


def make_case(B: int, nh: int, T: int, S: int, hs: int, causal: bool, kinds: list[str], seed: int) -> dict:
    """One ragged attention case from ``seed`` (see ``ragged_cases``)."""
    g = torch.Generator().manual_seed(seed)
    q, dy = torch.randn(B, nh, T, hs, generator=g), torch.randn(B, nh, T, hs, generator=g)
    k, v = torch.randn(B, nh, S, hs, generator=g), torch.randn(B, nh, S, hs, generator=g)
    return {"q": q, "k": k, "v": v, "dy": dy, "causal": causal, "key_valid": key_valid_rows(kinds, S, seed)}


def as_double(case: dict) -> dict:
    """The case with its float tensors in float64 (for checks at float64 tolerance)."""
    return {n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t for n, t in case.items()}


def valid_rows(key_valid: torch.Tensor, T: int) -> torch.Tensor:
    """bool (B, 1, T, 1): queries whose own position is a valid token (the outputs anyone reads)."""
    return key_valid[:, -T:].view(key_valid.shape[0], 1, T, 1)


def assert_padding_invisible(attend, case: dict) -> None:
    """Property: rewriting k and v at padding positions leaves every valid query row's output unchanged."""
    q, k, v, causal, key_valid = (case[n] for n in ("q", "k", "v", "causal", "key_valid"))
    y = attend(q, k, v, causal, key_valid)
    pad = ~key_valid[:, None, :, None]  # (B, 1, S, 1)
    noise = torch.randn(k.shape, generator=torch.Generator().manual_seed(7))
    k2, v2 = torch.where(pad, 10 * noise, k), torch.where(pad, 10 * noise.flip(-1) + 5, v)
    y2 = attend(q, k2, v2, causal, key_valid)
    rows = valid_rows(key_valid, q.shape[2]).expand_as(y)
    torch.testing.assert_close(y[rows], y2[rows], rtol=1e-5, atol=1e-5, msg="a valid row's output moved with padding")


# -- dense backends against naive_attention ------------------------------------------------------------


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@HYPOTHESIS
@given(case=ragged_cases())
@example(case=make_case(2, 2, 9, 9, 16, True, ["left", "all"], seed=1))  # fully padded leading rows
@example(case=make_case(3, 1, 1, 30, 16, True, ["left", "right", "holes"], seed=2))  # one query after a cache
def test_every_dense_backend_equals_naive_at_every_row_with_padding(backend, case):
    q, k, v, causal, key_valid = (case[n] for n in ("q", "k", "v", "causal", "key_valid"))
    y = get_attention(backend)(q, k, v, causal, key_valid)
    assert torch.isfinite(y).all(), "NaN or inf in the output"
    torch.testing.assert_close(y, naive_attention(q, k, v, causal, key_valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
def test_an_all_valid_mask_gives_the_unmasked_result(backend):
    case = make_case(2, 2, 13, 29, 16, True, ["none", "none"], seed=3)
    q, k, v = case["q"], case["k"], case["v"]
    attend = get_attention(backend)
    torch.testing.assert_close(attend(q, k, v, True, case["key_valid"]), attend(q, k, v, True), rtol=1e-5, atol=1e-5)


@HYPOTHESIS
@given(case=ragged_cases(), block_q=st.integers(1, 12), block_k=st.integers(1, 12))
@example(case=make_case(1, 1, 20, 20, 16, True, ["left"], seed=5), block_q=4, block_k=4)
def test_flash_tiles_of_any_size_equal_naive_with_padding_forward_and_backward(case, block_q, block_k):
    # small tiles: with left padding whole (query block, key block) tiles are hidden from a row,
    # which must not turn the online softmax's exp(s - m) into exp(-inf + inf) = NaN
    q, k, v, dy, causal, key_valid = (as_double(case)[n] for n in ("q", "k", "v", "dy", "causal", "key_valid"))
    o, lse = flash.flash_forward(q, k, v, causal, block_q=block_q, block_k=block_k, key_valid=key_valid)
    o_ref, lse_ref = attention_with_lse(q, k, v, causal, key_valid)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    grads = flash.flash_backward(q, k, v, o, lse, dy, causal, block_q=block_q, block_k=block_k, key_valid=key_valid)
    for name, g, g_ref in zip("qkv", grads, grads_of(naive_attention, q, k, v, causal, dy, key_valid), strict=True):
        assert torch.isfinite(g).all(), f"NaN in d{name}"
        torch.testing.assert_close(g, g_ref, msg=f"d{name} differs from naive's")


@HYPOTHESIS
@given(case=ragged_cases(), num_splits=st.integers(1, 9), query_chunk=st.integers(1, 16))
@example(case=make_case(2, 1, 1, 24, 16, True, ["left", "all"], seed=6), num_splits=8, query_chunk=1)
def test_chunked_and_split_k_pieces_equal_naive_with_padding(case, num_splits, query_chunk):
    # many pieces: a piece made only of padding keys must weigh nothing in the merge (lse = -inf)
    q, k, v, causal, key_valid = (case[n] for n in ("q", "k", "v", "causal", "key_valid"))
    ref = naive_attention(q, k, v, causal, key_valid)
    chunked = mea.chunked_attention(q, k, v, causal, num_splits, query_chunk, key_valid)
    split_k = mea.split_k_attention(q, k, v, causal, num_splits, key_valid)
    for name, y in (("chunked", chunked), ("split-K", split_k)):
        assert torch.isfinite(y).all(), f"NaN in {name} attention"
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, msg=f"{name} differs from naive")


@pytest.mark.parametrize("backend", DENSE_BACKENDS)
@HYPOTHESIS
@given(case=ragged_cases(max_T=24))
def test_gradients_with_padding_equal_naive(backend, case):
    # the upstream gradient reaches valid rows only: what a training loss over real tokens sends back
    q, k, v, causal, key_valid = (case[n] for n in ("q", "k", "v", "causal", "key_valid"))
    dy = case["dy"] * valid_rows(key_valid, q.shape[2])
    grads = grads_of(get_attention(backend), q, k, v, causal, dy, key_valid)
    for name, g, g_ref in zip("qkv", grads, grads_of(naive_attention, q, k, v, causal, dy, key_valid), strict=True):
        assert torch.isfinite(g).all(), f"NaN in d{name}"
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=f"d{name} differs from naive's")


@pytest.mark.parametrize("backend", [*DENSE_BACKENDS, "sparse_window"])
@pytest.mark.parametrize(("T", "S"), [(9, 9), (40, 40), (1, 37), (6, 37)])
def test_padding_keys_are_invisible_to_valid_rows(backend, T, S):
    case = make_case(3, 2, T, S, 16, True, ["left", "right", "holes"], seed=T * 100 + S)
    assert_padding_invisible(get_attention(backend), case)
    assert_padding_invisible(get_attention(backend), {**case, "causal": False})


def test_the_invisibility_check_rejects_a_backend_that_sees_padding():
    # left padding: every valid query comes after the padding keys, so a leaky mask shows at once
    case = make_case(2, 2, 12, 12, 16, True, ["left", "holes"], seed=11)
    assert_padding_invisible(get_attention("naive"), case)  # the check passes the real rule ...
    with pytest.raises(AssertionError, match="valid row"):
        assert_padding_invisible(get_attention("mutant_sees_padding"), case)  # ... and fails the mutant


def test_fully_padded_rows_give_finite_outputs_and_gradients_everywhere():
    case = make_case(2, 2, 21, 21, 16, True, ["all", "left"], seed=12)
    key_valid = case["key_valid"]
    key_valid[1, :17] = False  # row 1: 17 leading padding queries, each with only itself to see
    for backend in [*DENSE_BACKENDS, "sparse_window"]:
        q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
        y = get_attention(backend)(q, k, v, True, key_valid)
        y.backward(case["dy"])
        for name, t in (("y", y), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            assert torch.isfinite(t).all(), f"{backend}: NaN in {name}"


# -- sparse backends against their pattern as a dense token mask ----------------------------------


def dense_pattern_reference(q, k, v, layout, block_size, causal, key_valid, block_bias=None):
    """softmax over the pattern's token mask AND the padding rule, every score computed (float64)."""
    T, S, hs = q.shape[2], k.shape[2], q.shape[3]
    mask = expand_layout(layout, block_size, S, causal)[..., S - T :, :] & visibility(T, S, key_valid, causal)
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(hs)
    if block_bias is not None:
        bias = block_bias.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)
        scores = scores + bias[..., S - T : S, :S]
    return (torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.double()).float()


@pytest.mark.parametrize("kind", ["window", "bigbird", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 5, 16, 37])
def test_every_pattern_keeps_each_query_own_position(kind, causal, T):
    # the "own position" exception needs no pattern change: the diagonal block and causality keep it
    layout = build_layout(kind, num_blocks(T, 4), causal, window=1, n_global=1, n_random=1, seed=0, stride=2)
    assert expand_layout(layout, 4, T, causal).diagonal(dim1=-2, dim2=-1).all()


@HYPOTHESIS
@given(case=ragged_cases(), block_size=st.sampled_from([1, 4, 7, 16]))
@example(case=make_case(2, 2, 30, 30, 16, True, ["left", "all"], seed=13), block_size=4)
def test_sparse_window_backend_equals_its_dense_masked_pattern_with_padding(case, block_size):
    q, k, v, causal, key_valid = (case[n] for n in ("q", "k", "v", "causal", "key_valid"))
    S = k.shape[2]
    settings_ = {**SPARSE_WINDOW, "block_size": block_size}
    y = impl.sparse_attention.sparse_window_attention(**settings_)(q, k, v, causal, key_valid)
    layout = window_layout(num_blocks(S, block_size), settings_["window"], settings_["n_global"], causal)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, dense_pattern_reference(q, k, v, layout, block_size, causal, key_valid),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["window", "bigbird", "fixed"])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_and_dense_masked_sparse_agree_with_padding_on_every_pattern(kind, causal):
    case = make_case(3, 2, 29, 29, 16, causal, ["left", "right", "holes"], seed=14)  # 29: a short last block
    q, k, v, key_valid = (case[n] for n in ("q", "k", "v", "key_valid"))
    layout = build_layout(kind, num_blocks(29, 4), causal, window=1, n_global=1, n_random=2, seed=1, stride=3)
    ref = dense_pattern_reference(q, k, v, layout, 4, causal, key_valid)
    for attend in (sparse_fast.sparse_attention, sparse_naive.sparse_attention):
        torch.testing.assert_close(attend(q, k, v, layout, 4, causal, key_valid=key_valid), ref,
                                   rtol=1e-5, atol=1e-5)


def test_block_sparse_gradients_with_padding_equal_the_dense_masked_ones():
    case = make_case(2, 2, 23, 23, 16, True, ["left", "holes"], seed=15)
    q, k, v, dy, key_valid = (as_double(case)[n] for n in ("q", "k", "v", "dy", "key_valid"))
    layout = window_layout(num_blocks(23, 4), 1, 1, True)

    def grads(attend):
        def attend_pattern(q, k, v, causal):
            return attend(q, k, v, layout, 4, causal, key_valid=key_valid)

        return grads_of(attend_pattern, q, k, v, True, dy)

    for g, g_ref in zip(grads(sparse_fast.sparse_attention), grads(sparse_naive.sparse_attention), strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref)


# -- the learned (routed) sparse attention ------------------------------------------------------------


def _learned_module(seed: int = 0) -> learned.LearnedSparseAttention:
    torch.manual_seed(seed)
    module = learned.LearnedSparseAttention(head_size=16, block_size=4, top_k=2)
    with torch.no_grad():  # not the identity: a router whose choice depends on the pooled vectors
        module.w_query.add_(0.5 * torch.randn_like(module.w_query))
        module.w_key.add_(0.5 * torch.randn_like(module.w_key))
    return module


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [4, 23, 32])
def test_learned_sparse_equals_its_dense_masked_routed_pattern_with_padding(causal, T):
    case = make_case(3, 2, T, T, 16, causal, ["left", "right", "holes"], seed=16 + T)
    q, k, v, key_valid = (case[n] for n in ("q", "k", "v", "key_valid"))
    module = _learned_module()
    y = module(q, k, v, causal, key_valid)
    layout, _ = learned.route_blocks(q, k, module.w_query, module.w_key, 4, 2, causal, key_valid)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, dense_pattern_reference(q, k, v, layout, 4, causal, key_valid),
                               rtol=1e-5, atol=1e-5)
    naive_y = learned.learned_attention_naive(q, k, v, module.w_query, module.w_key, 4, 2, causal, key_valid)
    torch.testing.assert_close(y, naive_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_learned_routing_and_output_ignore_what_padding_tokens_hold(causal):
    # padding q, k and v all rewritten: neither the routed blocks nor a valid row's output may move
    case = make_case(3, 2, 24, 24, 16, causal, ["left", "right", "holes"], seed=17)
    q, key_valid = case["q"], case["key_valid"]
    key_valid[2] = torch.arange(24) % 4 != 0  # every block (of 4) starts with a padding token
    module = _learned_module()
    pad = ~key_valid[:, None, :, None]
    case2 = {**case, "q": torch.where(pad, 10 * torch.randn_like(q), q)}
    y = module(q, case["k"], case["v"], causal, key_valid)
    assert_padding_invisible(module, case)
    y_q = module(case2["q"], case["k"], case["v"], causal, key_valid)
    rows = valid_rows(key_valid, 24).expand_as(y)
    torch.testing.assert_close(y[rows], y_q[rows], rtol=1e-5, atol=1e-5)


def test_learned_router_never_picks_an_all_padding_key_block():
    case = make_case(2, 2, 24, 24, 16, False, ["none", "none"], seed=18)
    key_valid = case["key_valid"]
    key_valid[0, 8:16] = False  # row 0: key blocks 2 and 3 (of 4 tokens) are all padding
    module = _learned_module()
    layout, _ = learned.route_blocks(case["q"], case["k"], module.w_query, module.w_key, 4, 5, False, key_valid)
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert not (layout[0][..., [2, 3]] & off_diagonal[:, [2, 3]]).any()
    assert layout[1].sum(-1).min() == 6  # row 1, no padding: top 5 of 5 candidates, plus the diagonal


def test_learned_sparse_gives_finite_gradients_with_fully_padded_rows():
    case = make_case(2, 2, 16, 16, 16, True, ["all", "left"], seed=19)
    module = _learned_module()
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    y = module(q, k, v, True, case["key_valid"])
    y.backward(case["dy"])
    for t in (y, q.grad, k.grad, v.grad, module.w_query.grad, module.w_key.grad):
        assert torch.isfinite(t).all()
