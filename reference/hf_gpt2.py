"""HF transformers ``GPT2LMHeadModel`` with our weights copied in: the oracle that proves our
GPT is a real GPT-2-style model, and the peer our generation races."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from impl.gpt.model import GPT

hf_logging.set_verbosity_error()  # our tiny vocabularies trip HF's warnings about GPT-2's eos id


def to_hf(model: GPT) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` computing the same function as ``model`` (weights copied)."""
    c = model.config
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.block_size,
            n_embd=c.n_embd,
            n_layer=c.n_layer,
            n_head=c.n_head,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=1e-5,
            bos_token_id=0,
            eos_token_id=None,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
    )
    ours = model.state_dict()
    theirs = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight":
            continue  # tied to wte in both models
        hf_name = "transformer." + name.replace("blocks.", "h.")
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # HF's Conv1D stores (in, out); nn.Linear stores (out, in)
        theirs[hf_name] = tensor
    if not c.bias:  # GPT-2 always has biases: ours are zero
        for name, tensor in hf.state_dict().items():
            if name.endswith(".bias") and name not in theirs and "attn.bias" not in name:
                theirs[name] = torch.zeros_like(tensor)
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    left = [m for m in missing if m != "lm_head.weight" and not m.endswith("attn.bias")]
    if left or unexpected:
        raise ValueError(f"weight copy to GPT2LMHeadModel incomplete: missing {left}, unexpected {unexpected}")
    hf.to(dtype=next(model.parameters()).dtype)
    return hf.eval()


@torch.no_grad()
def logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """HF logits (B, T, vocab) for the GPT described by ``config`` with weights ``state``."""
    return to_hf(GPT.from_state(config, state))(idx).logits


@torch.no_grad()
def generate(hf: GPT2LMHeadModel, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """Greedy ``generate``: (B, T) -> (B, T + max_new_tokens), with HF's own KV cache, or without it
    (``use_cache=False``: every step re-runs the whole context)."""
    return hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """HF's greedy continuation of ``prompt`` with our weights copied in."""
    return generate(to_hf(GPT.from_state(config, state)), prompt, max_new_tokens)
