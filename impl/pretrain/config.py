"""The 125M-parameter shape for our 10K BPE vocabulary, and its parameter count in closed form.

GPT-2 small (12 layers, 12 heads, 768 wide, 1024 positions) has 124M parameters only because of
its 50,257-token vocabulary: 38.6M of them are the token embedding. With a 10K vocabulary the
same shape has 93.5M. We keep GPT-2's depth, heads of 64 and 1024 positions, and widen:

    12 layers x 14 heads x 64 = 896 wide, vocab 10,000, block 1024  ->  125,624,576 parameters

(16 layers x 768 would give 121.9M; 14 x 832 gives 125.6M with 13 heads.)
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from impl.gpt.model import GPT, GPTConfig
from impl.train.loop import TrainConfig

VOCAB_10K = 10_000
HEAD_DIM = 64


def gpt_125m(vocab_size: int = VOCAB_10K, **overrides) -> GPTConfig:
    """The 125M configuration (12 x 896, 14 heads of 64, 1024 positions) for ``vocab_size``."""
    shape = dict(vocab_size=vocab_size, block_size=1024, n_layer=12, n_head=14, n_embd=14 * HEAD_DIM,
                 dropout=0.0, bias=True)
    return GPTConfig(**{**shape, **overrides})


def gpt_small_cpu(vocab_size: int = VOCAB_10K, **overrides) -> GPTConfig:
    """A shape that pre-trains in minutes on 2 CPU cores: 4 layers x 128 wide, block 128 (2.1M
    parameters, 1.3M of them the tied 10K embedding: the output softmax dominates the compute)."""
    shape = dict(vocab_size=vocab_size, block_size=128, n_layer=4, n_head=2, n_embd=2 * HEAD_DIM,
                 dropout=0.0, bias=True)
    return GPTConfig(**{**shape, **overrides})


def param_count(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> int:
    """Parameters of our GPT (biases on, lm_head tied to the token embedding), in closed form.

    With V = vocab, P = positions, L = layers, C = width:

        V*C  +  P*C  +  L * (12*C^2 + 13*C)  +  2*C
        wte     wpe     blocks                  ln_f

    One block: c_attn C*3C + 3C, attn c_proj C*C + C, c_fc C*4C + 4C, mlp c_proj 4C*C + C,
    two LayerNorms 2 * 2C; that is 12*C^2 weights and 13*C biases and gains. ``n_head`` does
    not change the count (heads split the width); it is an argument so every count function
    takes the same shape.
    """
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
    C = n_embd
    return vocab_size * C + block_size * C + n_layer * (12 * C * C + 13 * C) + 2 * C


def counted_params(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> int:
    """Parameters of ``GPT`` of this shape, counted on the meta device (no memory is allocated)."""
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                    n_embd=n_embd, bias=True)
    with torch.device("meta"):
        return GPT(cfg).num_params()


def shape_of(cfg: GPTConfig) -> dict[str, int]:
    """The five numbers the parameter count depends on, as keyword arguments."""
    return dict(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_embd=cfg.n_embd)


def train_preset(name: str, **overrides) -> tuple[GPTConfig, TrainConfig]:
    """(model shape, recipe) of a named preset, with ``overrides`` of the recipe: ``small`` (5
    minutes on 2 CPU cores) or ``125m`` (nanoGPT's GPT-2 124M recipe: lr 6e-4 -> 6e-5, beta2 0.95,
    2,000 warm-up steps, 600K steps; its batch is ~0.5M tokens, ours 8 x 1024 by accumulation)."""
    if name == "small":
        model = gpt_small_cpu()
        recipe = TrainConfig(max_iters=1200, batch_size=16, block_size=model.block_size, learning_rate=6e-3,
                             min_lr=6e-4, warmup_iters=30, lr_decay_iters=1200, beta2=0.95,
                             eval_interval=200, eval_iters=10, log_interval=10, dtype="bf16")
    elif name == "125m":
        model = gpt_125m(gradient_checkpointing=True)
        recipe = TrainConfig(max_iters=600_000, batch_size=1, block_size=model.block_size, grad_accum_steps=8,
                             learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000, lr_decay_iters=600_000,
                             beta2=0.95, eval_interval=1000, eval_iters=20, log_interval=10, dtype="bf16")
    else:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return model, TrainConfig(**{**asdict(recipe), **overrides})


PRESETS = ("small", "125m")
