"""Unit tests of project 5: LoRA layers, adapters on disk, NF4 and the trainable share."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from impl.gpt.model import GPT, GPTConfig
from impl.lora import fast, nf4
from impl.lora.fast import LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter, trainable_parameters
from impl.lora.qlora import LLAMA_7B_SHAPE, build_qlora_model
from reference import bnb_nf4


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()


def test_lora_with_zero_b_returns_the_base_output_exactly():
    base = nn.Linear(12, 7)
    x = torch.randn(3, 12)
    assert torch.equal(LoRALinear(base, rank=4, alpha=8)(x), base(x))


def test_apply_lora_leaves_the_model_output_unchanged_and_trains_only_adapters():
    model = small_gpt()
    idx = torch.randint(30, (2, 9))
    before = model(idx)
    names = apply_lora(model, rank=4, alpha=8)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert torch.equal(model(idx), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_merge_then_unmerge_restores_the_weight_and_merge_keeps_the_output():
    base = nn.Linear(10, 6)
    original = base.weight.detach().clone()
    lora = LoRALinear(base, rank=3, alpha=6)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 10)
    unmerged_out = lora(x)
    lora.merge()
    torch.testing.assert_close(lora(x), unmerged_out, rtol=1e-5, atol=1e-6)
    lora.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    assert not lora.merged


def test_merge_lora_puts_plain_linears_back():
    model = small_gpt()
    apply_lora(model, rank=2)
    merge_lora(model)
    assert not fast.lora_modules(model)
    assert isinstance(model.blocks[0].attn.c_attn, nn.Linear)


def test_merging_into_an_nf4_base_is_refused():
    lora = LoRALinear(nf4.NF4Linear.from_linear(nn.Linear(64, 8)), rank=2, alpha=4)
    with pytest.raises(ValueError, match="NF4"):
        lora.merge()


def test_dropout_acts_only_in_training():
    lora = LoRALinear(nn.Linear(32, 32), rank=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(8, 32)
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    lora.train()
    torch.manual_seed(0)
    first = lora(x)
    torch.manual_seed(1)
    assert not torch.equal(first, lora(x))


def test_a_pattern_that_matches_nothing_names_itself_and_the_model_linears():
    with pytest.raises(ValueError, match=r"q_proj.*c_attn"):
        apply_lora(small_gpt(), targets=("q_proj",))


def test_saved_adapter_round_trips_into_a_fresh_model(tmp_path):
    model = small_gpt()
    apply_lora(model, targets=("c_attn", "c_fc"), rank=3, alpha=5)
    with torch.no_grad():
        for m in fast.lora_modules(model).values():
            m.lora_B.normal_()
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = small_gpt()  # same base weights, no LoRA yet: load_adapter wraps from the file's config
    load_adapter(fresh, path)
    idx = torch.randint(30, (1, 8))
    assert torch.equal(fresh(idx), model(idx))
    assert fast.read_adapter_config(path) == {"rank": 3, "alpha": 5, "targets": ["c_attn", "c_fc"]}


def test_adapter_of_another_rank_is_refused(tmp_path):
    model = small_gpt()
    apply_lora(model, rank=2)
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = small_gpt()
    apply_lora(other, rank=4)
    with pytest.raises(ValueError, match="rank 2"):
        load_adapter(other, path)


def test_nf4_code_table_matches_bitsandbytes_to_the_last_bit_of_float32():
    ours, theirs = nf4.nf4_code_values(), bnb_nf4.code_values()
    assert ours[7] == 0 and ours[0] == -1 and ours[-1] == 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2.0**-23)


def test_nf4_error_is_at_most_half_the_widest_level_gap_times_the_block_scale():
    w = torch.randn(64, 256)
    q = nf4.quantize_nf4(w, double_quant=False)
    err = (nf4.dequantize_nf4(q) - w).abs().view(-1, 64)
    half_gap = (nf4.CODE[1:] - nf4.CODE[:-1]).max() / 2
    assert (err <= half_gap * q.absmax[:, None] * (1 + 1e-6)).all()


def test_double_quantized_scales_are_within_half_an_int8_step():
    absmax = torch.rand(1000) * 3 + 0.1
    codes, step, offset = nf4._double_quantize(absmax)
    q = nf4.NF4Tensor(torch.zeros(0, dtype=torch.uint8), torch.Size((1000 * 64,)), torch.float32,
                      scale_codes=codes, scale_scales=step, scale_offset=offset)
    assert ((q.scales() - absmax).abs() <= step.repeat_interleave(256)[:1000] / 2 * (1 + 1e-5)).all()


def test_nf4_takes_about_4_bits_per_weight_with_double_quantization():
    q = nf4.quantize_nf4(torch.randn(256, 1024))
    assert q.nbytes() * 8 / (256 * 1024) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)


def test_nf4_linear_without_double_quant_equals_bitsandbytes_linear4bit():
    lin = nn.Linear(128, 40)
    x = torch.randn(5, 128)
    ours = nf4.NF4Linear.from_linear(lin, double_quant=False)(x)
    theirs = bnb_nf4.linear4bit_forward(lin.weight.detach(), lin.bias.detach(), x, double_quant=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_the_input_through_an_nf4_layer():
    layer = nf4.NF4Linear.from_linear(nn.Linear(64, 32))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized().sum(dim=0).expand(3, -1))


def test_trainable_share_of_a_7b_shaped_gpt_on_the_meta_device():
    trainable, total = fast.trainable_count(LLAMA_7B_SHAPE, 32, fast.TARGETS)
    assert trainable == 32 * 32 * (4096 + 3 * 4096 + 4096 + 4096 + 4096 + 4 * 4096 + 4 * 4096 + 4096)
    assert total == 6_582_177_792 + trainable  # the base GPT (tied embedding once) plus the adapters
    assert 0.005 <= trainable / total <= 0.02


def test_qlora_model_trains_only_fp32_adapters_over_nf4():
    model = build_qlora_model({"n_layer": 1, "n_embd": 64, "n_head": 2, "vocab_size": 50, "block_size": 16})
    assert all(isinstance(m.base, nf4.NF4Linear) for m in fast.lora_modules(model).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    loss = model(torch.randint(50, (1, 8))).float().sum()
    loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert trainable_parameters(model)[1] > sum(p.numel() for p in model.parameters())
