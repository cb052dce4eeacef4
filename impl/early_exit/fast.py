"""Early-exit greedy generation with less overhead per token; same algorithm as ``naive.py``.

What changes, each at the line that does it:

- confidence is asked only every ``check_every`` layers (layers check_every, 2 check_every, ...):
  an exit head costs a (C x V) matmul, as much as a whole block of this small model, so checking
  after every block can cost more than the blocks an exit saves;
- the skipped layers' K/V are filled in one batched matmul: every skipped layer's ``ln_1`` sees the
  same copied state, so it is normalised once, each layer's affine is applied as one broadcast, and
  one ``baddbmm`` over the stacked K/V rows of the layers' ``c_attn`` writes all of them straight
  into the cache's buffers (naive: a LayerNorm and a linear per skipped layer);
- positions come from one pre-built range; the full model's head is used at the last layer as in
  naive, so a threshold above 1 still gives the full model's tokens and logits bit for bit.

``forced`` feeds given tokens instead of the argmax (teacher forcing): the logits then score a
held-out text, which gives the early-exit model's perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from impl.early_exit.heads import ExitHeads, confidence
from impl.early_exit.naive import ExitGeneration, _models
from impl.gpt.model import GPT
from impl.kv_cache.fast import KVCache


class SkippedKV:
    """Every block's ``ln_1`` and the K/V rows of its ``c_attn``, stacked so the K/V of the layers a
    token skipped come from one batched matmul."""

    def __init__(self, model: GPT):
        blocks = model.blocks
        C = model.config.n_embd
        p = model.lm_head.weight
        self.eps = blocks[0].ln_1.eps
        self.gamma = torch.stack([b.ln_1.weight for b in blocks])  # (L, C)
        self.beta = torch.stack([b.ln_1.bias if b.ln_1.bias is not None else torch.zeros_like(b.ln_1.weight)
                                 for b in blocks])  # (L, C)
        self.weight_t = torch.stack([b.attn.c_attn.weight[C:].T for b in blocks])  # (L, C, 2C): K and V rows
        self.bias = torch.stack([b.attn.c_attn.bias[C:] if b.attn.c_attn.bias is not None
                                 else torch.zeros(2 * C, dtype=p.dtype, device=p.device) for b in blocks])  # (L, 2C)
        self.n_head, self.head_dim = blocks[0].attn.n_head, blocks[0].attn.head_dim
        if any(b.attn.n_head != self.n_head for b in blocks):
            raise ValueError("the batched K/V fill needs the same head count in every layer (use naive.py)")

    def fill(self, cache: KVCache, first: int, h: torch.Tensor) -> None:
        """Write the K/V of blocks ``first`` .. L-1 (0-based) computed from the state ``h`` (1, 1, C) at
        the cache's current position."""
        n = self.gamma.shape[0] - first
        if n == 0:
            return
        hn = F.layer_norm(h.view(1, -1), h.shape[-1:], eps=self.eps)  # (1, C): the same for every skipped layer
        x = torch.addcmul(self.beta[first:], hn, self.gamma[first:])  # (n, C): each layer's ln_1 affine
        kv = torch.baddbmm(self.bias[first:].unsqueeze(1), x.unsqueeze(1), self.weight_t[first:])  # (n, 1, 2C)
        kv = kv.view(n, 2, self.n_head, self.head_dim)  # (n, k|v, nh, hs)
        cache.k[first:, 0, :, cache.position] = kv[:, 0]
        cache.v[first:, 0, :, cache.position] = kv[:, 1]


def should_exit(confidence: float, threshold: float) -> bool:
    """The exit rule: leave once the confidence reaches the threshold (a threshold above 1 never exits)."""
    return confidence >= threshold


@torch.no_grad()
def generate(model: GPT, heads: ExitHeads, prompt: torch.Tensor, max_new_tokens: int, threshold: float,
             measure: str = "max_prob", check_every: int = 1, forced: torch.Tensor | None = None,
             skipped: SkippedKV | None = None) -> ExitGeneration:
    """``naive.generate`` with confidence checked after layers check_every, 2 check_every, ... only and the
    skipped layers' K/V filled by ``skipped`` (built from ``model`` when not given). With ``forced`` (1, n)
    the i-th new token is ``forced[0, i]`` instead of the argmax (the logits are still recorded)."""
    if prompt.shape[0] != 1:
        raise ValueError(f"early exit decides per token: batch 1 only, got a batch of {prompt.shape[0]}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if forced is not None and forced.shape[1] < max_new_tokens:
        raise ValueError(f"forced has {forced.shape[1]} tokens, fewer than max_new_tokens = {max_new_tokens}")
    L = model.config.n_layer
    T = prompt.shape[1]
    skipped = skipped or SkippedKV(model)
    checked = [layer % check_every == 0 for layer in range(1, L)]
    positions = torch.arange(T + max_new_tokens, device=prompt.device)
    cache = KVCache.for_model(model, 1, T + max_new_tokens)
    logits = model(prompt, cache=cache)[0, -1]
    out, all_logits = [prompt], [logits]
    exits = [L]
    confs = torch.full((max_new_tokens, L - 1), math.nan)
    for step in range(max_new_tokens):
        next_id = logits.argmax().view(1, 1) if forced is None else forced[:, step:step + 1]
        out.append(next_id)
        if step + 1 == max_new_tokens:
            break
        x = model.embed(next_id, positions[cache.position:cache.position + 1])  # (1, 1, C)
        for layer, block in enumerate(model.blocks, start=1):
            x = block(x, cache)
            if layer == L:
                logits = model.head(x)[0, -1]
                break
            if not checked[layer - 1]:  # no exit head at this layer: its (C x V) matmul is saved
                continue
            logits = heads.logits(layer, x, model)[0, -1]
            c = confidence(logits, measure).item()
            confs[step + 1, layer - 1] = c
            if should_exit(c, threshold):
                break
        skipped.fill(cache, layer, x)  # CALM: the exit state copied up, all skipped layers in one matmul
        cache.advance(1)
        all_logits.append(logits)
        exits.append(layer)
    return ExitGeneration(torch.cat(out, dim=1), torch.stack(all_logits), torch.tensor(exits, dtype=torch.long),
                          confs, cache, T)


def trace(config: dict, state: dict, heads_state: dict, prompt: torch.Tensor, max_new_tokens: int,
          threshold: float, measure: str = "max_prob") -> ExitGeneration:
    """The checks' contract: ``generate`` with every layer checked (``check_every = 1``)."""
    model, heads = _models(config, state, heads_state)
    return generate(model, heads, prompt, max_new_tokens, threshold, measure)


def trace_every_2(config: dict, state: dict, heads_state: dict, prompt: torch.Tensor, max_new_tokens: int,
                  threshold: float, measure: str = "max_prob") -> ExitGeneration:
    """The checks' contract: ``generate`` with confidence checked after every second layer only."""
    model, heads = _models(config, state, heads_state)
    return generate(model, heads, prompt, max_new_tokens, threshold, measure, check_every=2)


def greedy(config: dict, state: dict, heads_state: dict, prompt: torch.Tensor, max_new_tokens: int,
           threshold: float, measure: str = "max_prob") -> dict[str, torch.Tensor]:
    """``{"tokens", "logits"}`` of ``trace_every_2`` (the never-exit check)."""
    out = trace_every_2(config, state, heads_state, prompt, max_new_tokens, threshold, measure)
    return {"tokens": out.tokens, "logits": out.logits}
