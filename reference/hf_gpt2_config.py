"""HF transformers ``GPT2LMHeadModel`` of a given shape, built on the meta device: the trusted
parameter count our closed-form formula and our GPT are checked against."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # a 10K vocabulary trips HF's warning about GPT-2's token ids


def param_count(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, tied: bool = True) -> int:
    """Parameters of ``GPT2LMHeadModel(GPT2Config(...))`` of this shape (tied head counted once; ``tied=False``
    builds it with ``tie_word_embeddings=False``: the head is a second vocab x n_embd matrix, no bias)."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    with torch.device("meta"):  # shapes only: a 125M model costs no memory here
        model = GPT2LMHeadModel(config)
    return model.num_parameters()
