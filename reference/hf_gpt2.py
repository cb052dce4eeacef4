"""HF transformers ``GPT2LMHeadModel`` with our weights copied in: the oracle that proves our
GPT is a real GPT-2-style model, and the peer our generation races."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from impl.gpt.model import GPT
from impl.kv_cache.fast import pad_prompts

hf_logging.set_verbosity_error()  # our tiny vocabularies trip HF's warnings about GPT-2's eos id


def to_hf(model: GPT) -> GPT2LMHeadModel:
    """A ``GPT2LMHeadModel`` computing the same function as ``model`` (weights copied); an untied
    ``model`` (``tie_embeddings=False``) gets an untied HF model with its own ``lm_head``."""
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
            tie_word_embeddings=c.tie_embeddings,
        )
    )
    ours = model.state_dict()
    theirs = {}
    for name, tensor in ours.items():
        if name == "lm_head.weight":
            if not c.tie_embeddings:
                theirs[name] = tensor  # HF's untied head is an nn.Linear too: (vocab, n_embd)
            continue  # tied: HF ties it to wte itself
        hf_name = "transformer." + name.replace("blocks.", "h.")
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # HF's Conv1D stores (in, out); nn.Linear stores (out, in)
        theirs[hf_name] = tensor
    if not c.bias:  # GPT-2 always has biases: ours are zero
        for name, tensor in hf.state_dict().items():
            if name.endswith(".bias") and name not in theirs and "attn.bias" not in name:
                theirs[name] = torch.zeros_like(tensor)
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    left = [m for m in missing if not (m == "lm_head.weight" and c.tie_embeddings) and not m.endswith("attn.bias")]
    if left or unexpected:
        raise ValueError(f"weight copy to GPT2LMHeadModel incomplete: missing {left}, unexpected {unexpected}")
    hf.to(dtype=next(model.parameters()).dtype)
    return hf.eval()


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids HF's ``generate`` gives a padded batch: real tokens counted from 0 in each
    row, padding at 1 (``GenerationMixin``'s rule; GPT-2's forward alone would count slots)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def logits(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF logits (B, T, vocab) for the GPT described by ``config`` with weights ``state``; a
    padded batch passes ``attention_mask`` (B, T) and gets ``hf_positions`` as its position ids."""
    hf = to_hf(GPT.from_state(config, state))
    if attention_mask is None:
        return hf(idx).logits
    return hf(idx, attention_mask=attention_mask, position_ids=hf_positions(attention_mask)).logits


@torch.no_grad()
def hidden_states(config: dict, state: dict[str, torch.Tensor], idx: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """HF's ``output_hidden_states``: n_layer + 1 tensors (B, T, C). HF applies the final
    LayerNorm to the last one; ours stops before it (compare ``ln_f(ours[-1])``)."""
    hf = to_hf(GPT.from_state(config, state))
    kwargs = {} if attention_mask is None else {
        "attention_mask": attention_mask, "position_ids": hf_positions(attention_mask)}
    return list(hf(idx, output_hidden_states=True, **kwargs).hidden_states)


@torch.no_grad()
def generate(hf: GPT2LMHeadModel, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy ``generate``: (B, T) -> (B, T + max_new_tokens), with HF's own KV cache, or without it
    (``use_cache=False``: every step re-runs the whole context). A left-padded batch passes its
    ``attention_mask`` (B, T)."""
    return hf.generate(
        idx,
        attention_mask=torch.ones_like(idx) if attention_mask is None else attention_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
    )


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """HF's greedy continuation of ``prompt`` with our weights copied in."""
    return generate(to_hf(GPT.from_state(config, state)), prompt, max_new_tokens)


def ragged_greedy(config: dict, state: dict[str, torch.Tensor], prompts: list[torch.Tensor],
                  max_new_tokens: int) -> torch.Tensor:
    """HF's greedy new tokens (B, max_new_tokens) for prompts of different lengths in one
    left-padded batch with its attention mask (HF's recipe for batched generation)."""
    idx, mask = pad_prompts(prompts)  # the same left-padded batch ours gets
    out = generate(to_hf(GPT.from_state(config, state)), idx, max_new_tokens, attention_mask=mask)
    return out[:, idx.shape[1]:]


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution HF's ``generate`` samples from: its temperature, top-k and top-p logits
    warpers, in its order, then softmax."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)
