"""HF transformers ``GPT2LMHeadModel`` trained with torch's AdamW: the peer our 125M training
step races. Same shape, same batch, same optimizer settings, same loss; nothing from ``impl/``
(a peer shares no code with what it is compared with)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # a 10K vocabulary trips HF's warning about GPT-2's token ids


def build(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
          device: str = "cpu", seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of this shape on ``device`` (tied head, no dropout, tanh GELU,
    torch SDPA attention), in train mode."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    return model.to(device).train()


def adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """torch AdamW, weight decay on the matrices only (the usual GPT recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def train_step(model: GPT2LMHeadModel, optimizer: torch.optim.Optimizer, idx: torch.Tensor,
               targets: torch.Tensor, dtype: torch.dtype | None = None, grad_clip: float = 1.0) -> torch.Tensor:
    """One AdamW step on (B, T) ids and their (B, T) next-token targets: forward (under autocast to
    ``dtype`` when given), cross-entropy in fp32, backward, gradient clipping, step. Returns the
    detached loss."""
    with torch.autocast(idx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(input_ids=idx).logits  # (B, T, vocab)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
