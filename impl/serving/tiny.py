"""A tiny chat-ready model for smoke tests: random weights, a small BPE with the chat special tokens.

The serving, Docker and UI checks need a model the server can load in a second on any machine, with
the same tokenizer kind and chat template as the zoo's ``chat`` model (the real one takes minutes to
build). Its answers are noise; what it proves is the plumbing (tokenize, schedule, stream, detokenize).

    from impl.serving.tiny import save_tiny_chat_model
    path = save_tiny_chat_model(tmp_path / "tiny")      # then: python -m impl.serving api --model PATH
"""

from __future__ import annotations

from pathlib import Path

import torch

from impl.bpe.fast import train_merges
from impl.bpe.tokenizer import Tokenizer
from impl.gpt.model import GPT, GPTConfig
from impl.sft.templates import END, SPECIAL_TOKENS

# A few lines to learn a handful of merges from: the tokenizer only has to be a real BPE, not a good one.
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end "
        "them. Hello! How are you today? I am fine, thank you. What is the capital of France? Paris. ") * 4


def tiny_chat_model(seed: int = 0, n_merges: int = 64, n_layer: int = 2, n_embd: int = 64,
                    block_size: int = 256, stops: bool = True) -> tuple[GPT, Tokenizer]:
    """``(model, tokenizer)``: a seeded random GPT over a BPE of ``256 + n_merges`` bytes and merges plus
    the six chat special tokens. Shaped so its noise reads as text: the embedding rows of unprintable bytes
    and of the special tokens other than ``<|end|>`` are zero (tied head: those ids never win), attention
    is sharpened so the context matters, and the final layer norm is scaled up so greedy decoding has no
    near-ties (its tokens do not flip with the batch a request shares). ``stops=False`` silences ``<|end|>``
    too: every answer runs to ``max_tokens`` (a test that must stop an answer midway needs one that lasts)."""
    specials = list(SPECIAL_TOKENS)
    merges = train_merges(TEXT, 256 + n_merges + len(specials), special_tokens=specials)
    tokenizer = Tokenizer(merges, "gpt4", specials)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer,
                          n_head=4, n_embd=n_embd))
    with torch.no_grad():
        model.ln_f.weight.mul_(3.0)
        silent = [b for b in range(256) if not 32 <= b < 127]
        silent += [i for t, i in tokenizer.special_tokens.items() if t != END or not stops]
        model.wte.weight[silent] = 0.0
        for block in model.blocks:
            block.attn.c_attn.weight.mul_(5.0)
            block.attn.c_proj.weight.mul_(10.0)
    return model.eval(), tokenizer


def save_tiny_chat_model(path: str | Path, seed: int = 0, **shape) -> Path:
    """Write ``tiny_chat_model(seed, **shape)`` as a model directory (``impl.zoo.save_dir``) at ``path``;
    ``impl.zoo.load_any(path)`` and ``--model PATH`` load it."""
    from impl.zoo import save_dir, tokenizer_metadata

    model, tokenizer = tiny_chat_model(seed, **shape)
    save_dir(path, model, {"model_config": model.config.to_dict(), "tokenizer": tokenizer_metadata(tokenizer),
                           "special_token_ids": tokenizer.special_tokens, "zoo_name": "tiny-chat"})
    return Path(path)
