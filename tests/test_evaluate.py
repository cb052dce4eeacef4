"""impl.train.evaluate: loss, perplexity and bits per byte have exact small figures; a wrong base fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from impl.gpt.model import GPT, GPTConfig
from impl.train import evaluate
from impl.train.evaluate import (
    bits_per_byte,
    bits_per_token,
    evaluate_ids,
    full_split_loss,
    masked_token_loss,
    perplexity,
    split_loss_sum,
)


class Uniform(torch.nn.Module):
    """A model whose logits are all zero: every next token has probability 1/V."""

    def __init__(self, vocab_size: int, block_size: int = 8):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=block_size)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.config.vocab_size) + 0 * self.dummy


@pytest.mark.parametrize("vocab", [2, 65, 4096])
def test_uniform_logits_give_ln_v_nats_and_log2_v_bits_per_token(vocab):
    ids = np.random.default_rng(0).integers(0, vocab, 100)
    model = Uniform(vocab)
    assert full_split_loss(model, ids) == pytest.approx(math.log(vocab), rel=1e-6)
    total, n = split_loss_sum(model, ids)
    assert n == 99 and total / n == pytest.approx(math.log(vocab), rel=1e-6)
    assert bits_per_token(total / n) == pytest.approx(math.log2(vocab), rel=1e-6)
    assert perplexity(total / n) == pytest.approx(vocab, rel=1e-5)  # fp32 sums


def test_char_model_on_ascii_has_bits_per_byte_equal_to_bits_per_token():
    # one byte per token: 65 equally likely characters cost log2(65) = 6.022 bits each
    ids = np.random.default_rng(1).integers(0, 65, 50)
    figures = evaluate_ids(Uniform(65), ids, token_nbytes=lambda i: 1)
    assert figures["bytes"] == figures["tokens"] == 49
    assert figures["bits_per_byte"] == pytest.approx(math.log2(65), rel=1e-6)
    assert figures["bits_per_byte"] == pytest.approx(figures["bits_per_token"], rel=1e-12)


def test_bits_per_byte_divides_the_bits_by_the_bytes_the_tokens_spell():
    # 4 bytes per token at ln(16) nats per token: 4 bits per token, 1 bit per byte
    assert bits_per_byte(math.log(16), n_tokens=10, n_bytes=40) == pytest.approx(1.0)
    figures = evaluate_ids(Uniform(16), np.arange(16) % 16, token_nbytes=lambda i: 4)
    assert figures["bits_per_byte"] == pytest.approx(1.0, rel=1e-6)
    # the first token is context, not scored: its bytes do not count (ids 1..15 spell 3 bytes each, id 0 spells 100)
    figures = evaluate_ids(Uniform(16), np.arange(16), token_nbytes=lambda i: 100 if i == 0 else 3)
    assert figures["bytes"] == 45 and figures["bits_per_byte"] == pytest.approx(4 / 3, rel=1e-6)


def test_a_wrong_logarithm_base_is_caught():
    """Mutants of bits_per_byte with the wrong base (log10, natural log, log2 twice) give other figures."""
    loss, n_tokens, n_bytes = math.log(256), 100, 100  # 8 bits per byte exactly
    assert bits_per_byte(loss, n_tokens, n_bytes) == pytest.approx(8.0)
    mutants = {
        "nats, no conversion": lambda nats, t, b: nats * t / b,
        "log10": lambda nats, t, b: nats * t / (b * math.log(10)),
        "multiplies by ln 2": lambda nats, t, b: nats * t * math.log(2) / b,
        "per token, not per byte": lambda nats, t, b: nats / math.log(2),
    }
    for name, mutant in mutants.items():
        assert mutant(loss, n_tokens, n_bytes * 2) != pytest.approx(bits_per_byte(loss, n_tokens, n_bytes * 2)), name


def test_split_loss_sum_scores_every_token_once_including_the_tail():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=1, n_embd=8)).eval()
    ids = np.random.default_rng(2).integers(0, 11, 11)  # 10 targets: two windows of 4 and a tail of 2
    total, n = split_loss_sum(model, ids, batch_size=1)
    expected = 0.0
    with torch.no_grad():
        for start, length in ((0, 4), (4, 4), (8, 2)):
            x = torch.from_numpy(ids[start:start + length].astype(np.int64))[None]
            y = torch.from_numpy(ids[start + 1:start + length + 1].astype(np.int64))
            expected += torch.nn.functional.cross_entropy(model(x)[0], y, reduction="sum").item()
    assert n == 10 and total == pytest.approx(expected, rel=1e-5)


def test_masked_token_loss_averages_only_the_masked_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 is confidently right about target 2; positions 1, 2 are uniform
    targets = torch.tensor([[2, 1, 3]])
    only_uniform = masked_token_loss(logits, targets, torch.tensor([[0, 1, 1]]))
    assert only_uniform.item() == pytest.approx(math.log(4), rel=1e-6)
    everything = masked_token_loss(logits, targets, torch.ones(1, 3))
    right = torch.nn.functional.cross_entropy(logits[0, :1], targets[0, :1]).item()
    assert everything.item() == pytest.approx((right + 2 * math.log(4)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="selects no position"):
        masked_token_loss(logits, targets, torch.zeros(1, 3))


def test_masked_token_loss_is_not_the_mean_over_all_positions():
    """Mutant: averaging over every position (mask ignored, or divided by T) must differ."""
    logits = torch.zeros(1, 4, 3)
    logits[0, :2, 0] = 8.0
    targets = torch.zeros(1, 4, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1]])
    ours = masked_token_loss(logits, targets, mask).item()
    per_token = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    assert ours == pytest.approx(math.log(3), rel=1e-6)
    assert ours != pytest.approx(per_token.mean().item(), rel=1e-3)  # unmasked mean
    assert ours != pytest.approx((per_token * mask[0]).sum().item() / 4, rel=1e-3)  # divided by T


def test_full_split_loss_is_importable_from_its_one_place():
    assert evaluate.full_split_loss is full_split_loss
