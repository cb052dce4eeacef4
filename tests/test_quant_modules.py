"""The shared quantization primitives (impl/ptq/quant.py) and the quantized layers that replace a GPT's
linear layers by name (impl/ptq/modules.py): grids, round trips, tying, files, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.gpt.model import GPT, GPTConfig
from impl.ptq.modules import (
    QuantEmbedding,
    QuantLinear,
    linear_names,
    load_quantized,
    model_nbytes,
    quantization_meta,
    quantize_model,
    save_quantized,
    use_int8_matmul,
)
from impl.ptq.quant import Scheme, dequantize, pack_int4, qparams, quantize, quantize_dequantize, unpack_int4

SCHEMES = [Scheme(8), Scheme(8, 16, False), Scheme(4, 16), Scheme(4, None, False), Scheme(3, 8), Scheme(2, 8, False)]


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_codes_stay_on_the_grid_and_the_round_trip_error_is_at_most_half_a_step(scheme: Scheme) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 32) * torch.logspace(-2, 1, 6)[:, None]
    scale, zero = qparams(x, scheme)
    q = quantize(x, scale, zero, scheme)
    assert q.dtype == scheme.storage
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    err = (dequantize(q, scale, zero, scheme) - x).abs().reshape(6, scheme.groups(32), -1)
    assert (err <= scale[..., None] / 2 + 1e-6).all()


def test_the_symmetric_grid_is_torchaos_and_the_asymmetric_grid_holds_zero_exactly() -> None:
    x = torch.tensor([[-1.0, 0.5, 3.0, 0.0]])
    scale, zero = qparams(x, Scheme(4))
    assert scale.item() == pytest.approx(3.0 / 7.5) and zero.item() == 0
    x = torch.tensor([[0.3, 0.5, 3.0, 0.7]])  # all positive: the range is widened to hold 0
    scale, zero = qparams(x, Scheme(4, None, False))
    assert zero.item() == 0 and scale.item() == pytest.approx(3.0 / 15)
    assert quantize_dequantize(torch.zeros(1, 4), Scheme(4, None, False)).abs().max() == 0


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 33), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_packing_round_trips_exactly_for_any_width(rows: int, n: int, signed: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, (rows, n), generator=g).to(torch.int8 if signed else torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (rows, (n + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, n, signed), q)


def test_a_row_that_does_not_split_into_groups_is_an_error_naming_both_sizes() -> None:
    with pytest.raises(ValueError, match="30 values .* groups of 16"):
        qparams(torch.randn(2, 30), Scheme(4, 16))
    with pytest.raises(ValueError, match="bits must be 2..8"):
        Scheme(9)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.label())
def test_a_quantized_linear_computes_with_the_rounded_weight(scheme: Scheme) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(32, 24, bias=True)
    layer = QuantLinear.from_linear(linear, scheme)
    w = quantize_dequantize(linear.weight.detach(), scheme)
    assert torch.equal(layer.dequantized(), w)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ w.T + linear.bias.detach(), rtol=1e-5, atol=1e-5)
    packed_bytes = 24 * 16 if scheme.bits <= 4 else 24 * 32
    assert layer.nbytes() == packed_bytes + layer.scale.numel() * 4 + (0 if scheme.symmetric else
                                                                        layer.zero.numel()) + 24 * 4


def test_w8a8_with_int_mm_stays_within_the_activation_rounding_of_the_dequantized_layer() -> None:
    torch.manual_seed(2)
    layer = QuantLinear.from_linear(nn.Linear(64, 48), Scheme(8))
    x = torch.randn(7, 64)
    reference = layer(x)
    layer.use_int8_matmul()
    y = layer(x)
    # each activation moves by at most half its token's step; the error is bounded by that step times |W| row sums
    step = x.abs().amax(dim=1, keepdim=True) / 127
    bound = step / 2 * layer.dequantized().abs().sum(dim=1)[None] + 1e-5
    assert ((y - reference).abs() <= bound).all()
    assert not torch.equal(y, reference)  # it really took the integer path
    with pytest.raises(ValueError, match="int8 per-channel symmetric"):
        QuantLinear.from_linear(nn.Linear(64, 48), Scheme(4, 16)).use_int8_matmul()


def test_bad_codes_or_scales_are_errors_naming_what_is_wrong() -> None:
    q = torch.full((4, 8), 9, dtype=torch.int8)
    with pytest.raises(ValueError, match="outside int4"):
        QuantLinear.from_codes(q, torch.ones(4, 1), torch.zeros(4, 1), Scheme(4))
    with pytest.raises(ValueError, match="scale has shape"):
        QuantLinear.from_codes(q.clamp(-8, 7), torch.ones(4, 2), torch.zeros(4, 2), Scheme(4))


def test_quantize_model_replaces_the_block_linears_by_name_and_leaves_the_tied_head_unless_asked() -> None:
    model = tiny_gpt()
    names = quantize_model(model, Scheme(4, 16))
    assert names == linear_names(tiny_gpt()) and len(names) == 8
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight


def test_a_quantized_tied_head_stays_one_tensor_the_embedding_reads_its_rows() -> None:
    model = tiny_gpt()
    fp32_bytes = model_nbytes(model)
    quantize_model(model, Scheme(8), lm_head=True)
    assert isinstance(model.wte, QuantEmbedding) and model.wte.head is model.lm_head
    idx = torch.tensor([[3, 0, 63, 3]])
    torch.testing.assert_close(model.wte(idx), model.lm_head.dequantized()[idx])
    assert not any(n.startswith("wte") for n in model.state_dict())  # no second copy of the head
    assert model_nbytes(model) < fp32_bytes / 3


@pytest.mark.parametrize("head", [False, True])
def test_a_saved_quantized_model_loads_back_with_identical_logits(tmp_path, head: bool) -> None:
    model = tiny_gpt()
    scheme = Scheme(4, 8, False)
    names = quantize_model(model, scheme, lm_head=head)
    meta = {"model_config": model.config.to_dict(), "tokenizer": {"kind": "char", "chars": [chr(65 + i) for i in
                                                                                              range(64)]}}
    save_quantized(tmp_path, model, meta, quantization_meta(scheme, names, "rtn"))
    loaded, _, loaded_meta = load_quantized(tmp_path)
    assert loaded_meta["quantization"]["names"] == names
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_precomputed_codes_are_used_and_unknown_names_are_an_error() -> None:
    model = tiny_gpt()
    name = "blocks.0.mlp.c_fc"
    q = torch.ones(128, 32, dtype=torch.int8)
    quantize_model(model, Scheme(4), weights={name: (q, torch.full((128, 1), 0.5), torch.zeros(128, 1))})
    assert torch.equal(model.get_submodule(name).dequantized(), torch.full((128, 32), 0.5))
    with pytest.raises(ValueError, match="does not replace"):
        quantize_model(tiny_gpt(), Scheme(4), weights={"blocks.9.mlp.c_fc": (q, q, q)})


def test_switching_a_model_to_int8_matmul_counts_its_layers() -> None:
    model = tiny_gpt()
    quantize_model(model, Scheme(8))
    assert use_int8_matmul(model) == 8
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))[0]).all()


def test_the_cli_quantizes_a_saved_model_reports_size_and_perplexity_and_writes_a_loadable_model(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from impl import zoo
    from impl.data.corpus import load_text
    from impl.data.tokens import CharTokenizer

    tokenizer = CharTokenizer.from_text(load_text("shakespeare"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    meta = {"model_config": model.config.to_dict(), "tokenizer": zoo.tokenizer_metadata(tokenizer),
            "recipe": {"corpus": "shakespeare", "val_fraction": 0.1}}
    zoo.save_dir(tmp_path / "fp32", model, meta)
    run = subprocess.run([sys.executable, "-m", "impl.ptq", str(tmp_path / "fp32"), "--bits", "4", "--group-size",
                          "16", "--lm-head", "--eval-tokens", "2000", "--out", str(tmp_path / "q4"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["scheme"] == "int4 g16 sym" and report["lm_head_quantized"] and report["layers"] == 5
    assert report["size_ratio"] > 2 and report["heldout_tokens"] == 2000
    assert report["file_bytes"] == (tmp_path / "q4" / "model.safetensors").stat().st_size
    loaded, _, _ = zoo.load_any(tmp_path / "q4")  # a quantized directory loads like any saved model
    assert isinstance(loaded.lm_head, QuantLinear) and isinstance(loaded.wte, QuantEmbedding)
    bad = subprocess.run([sys.executable, "-m", "impl.ptq", str(tmp_path / "fp32"), "--bits", "4", "--group-size",
                          "24"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not split into groups of 24" in bad.stderr
