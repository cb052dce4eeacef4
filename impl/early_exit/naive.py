"""Early-exit greedy generation, written out: per token, run the blocks one at a time through the
model's hidden-states seam (``embed`` -> ``blocks[i](x, cache)`` -> ``head``), ask the exit head after
each block how confident it is, stop at the first layer whose confidence reaches the threshold.

    for each new token:
        x = embed(token, position)
        for l = 1 .. L:
            x = block_l(x, cache)                      # writes layer l's K/V at this position
            if l == L: logits = head(x); break         # the full model
            logits = exit_head_l(x)
            if confidence(logits) >= threshold: break  # exit after block l
        for every skipped layer m = l+1 .. L:          # CALM: copy the exit state up
            cache[m] <- K/V of block m computed from x
        emit argmax(logits)

Batch 1 (the exit is per token). The prompt is prefilled by the full model, so the first new token
always comes from layer L. A threshold above 1 never exits: the tokens and logits are the full
model's, bit for bit (the same blocks in the same order on the same cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from impl.early_exit.heads import ExitHeads, confidence, heads_from_state, layer_kv
from impl.gpt.model import GPT
from impl.kv_cache.fast import KVCache


@dataclass
class ExitGeneration:
    """What an early-exit generation returns (batch 1, n new tokens, L layers)."""

    tokens: torch.Tensor  # (1, T + n): the prompt, then the new ids
    logits: torch.Tensor  # (n, V): the logits each new id is the argmax of (or was scored by, when forced)
    exit_layers: torch.Tensor  # (n,) long: the block each token left after (1..L; L = the full model)
    confidences: torch.Tensor  # (n, L - 1): each checked layer's confidence, NaN where not checked
    cache: KVCache  # every layer's K/V of every position but the last token's
    prompt_len: int

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated ids (1, n)."""
        return self.tokens[:, self.prompt_len:]


@torch.no_grad()
def generate(model: GPT, heads: ExitHeads, prompt: torch.Tensor, max_new_tokens: int, threshold: float,
             measure: str = "max_prob") -> ExitGeneration:
    """Greedy continuation of ``prompt`` (1, T) by ``max_new_tokens`` ids, each token leaving after the
    first layer whose exit head's ``measure`` confidence is >= ``threshold`` (every layer checked)."""
    if prompt.shape[0] != 1:
        raise ValueError(f"early exit decides per token: batch 1 only, got a batch of {prompt.shape[0]}")
    L = model.config.n_layer
    cache = KVCache.for_model(model, 1, prompt.shape[1] + max_new_tokens)
    logits = model(prompt, cache=cache)[0, -1]  # prefill: the whole prompt through the full model
    out, all_logits = [prompt], [logits]
    exits, confs = [L], [torch.full((L - 1,), math.nan)]
    for step in range(max_new_tokens):
        next_id = logits.argmax().view(1, 1)
        out.append(next_id)
        if step + 1 == max_new_tokens:
            break
        x = model.embed(next_id, torch.tensor([cache.position], device=prompt.device))  # (1, 1, C)
        row = torch.full((L - 1,), math.nan)
        for layer, block in enumerate(model.blocks, start=1):
            x = block(x, cache)
            logits = heads.logits(layer, x, model)[0, -1]  # (V,); layer L: the model's own head
            if layer == L:
                break
            row[layer - 1] = confidence(logits, measure).item()
            if row[layer - 1] >= threshold:
                break
        for skipped in range(layer, L):  # 0-based indices of the blocks this token never ran
            k, v = layer_kv(model.blocks[skipped], x)  # from the exit state, copied up
            cache.update(skipped, k, v)
        cache.advance(1)
        all_logits.append(logits)
        exits.append(layer)
        confs.append(row)
    return ExitGeneration(torch.cat(out, dim=1), torch.stack(all_logits), torch.tensor(exits, dtype=torch.long),
                          torch.stack(confs), cache, prompt.shape[1])


@torch.no_grad()
def full_generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's greedy tokens (1, T + n) and logits (n, V) through P8's pre-allocated cache."""
    cache = KVCache.for_model(model, prompt.shape[0], prompt.shape[1] + max_new_tokens)
    logits = model(prompt, cache=cache)[:, -1]
    out, all_logits = [prompt], [logits]
    for step in range(max_new_tokens):
        next_id = logits.argmax(dim=-1, keepdim=True)
        out.append(next_id)
        if step + 1 == max_new_tokens:
            break
        logits = model(next_id, cache=cache)[:, -1]
        all_logits.append(logits)
    return torch.cat(out, dim=1), torch.stack(all_logits, dim=1)[0]


def _models(config: dict, state: dict, heads_state: dict) -> tuple[GPT, ExitHeads]:
    model = GPT.from_state(config, state)
    return model, heads_from_state(model.config.n_layer, model.config.n_embd, heads_state)


def trace(config: dict, state: dict, heads_state: dict, prompt: torch.Tensor, max_new_tokens: int,
          threshold: float, measure: str = "max_prob") -> ExitGeneration:
    """The checks' contract: ``generate`` on the GPT ``config``/``state`` with exit heads ``heads_state``."""
    model, heads = _models(config, state, heads_state)
    return generate(model, heads, prompt, max_new_tokens, threshold, measure)


def greedy(config: dict, state: dict, heads_state: dict, prompt: torch.Tensor, max_new_tokens: int,
           threshold: float, measure: str = "max_prob") -> dict[str, torch.Tensor]:
    """``{"tokens", "logits"}`` of ``trace`` (what the never-exit check compares with the full model)."""
    out = trace(config, state, heads_state, prompt, max_new_tokens, threshold, measure)
    return {"tokens": out.tokens, "logits": out.logits}


def full_greedy(config: dict, state: dict, heads_state: dict, prompt: torch.Tensor, max_new_tokens: int,
                threshold: float, measure: str = "max_prob") -> dict[str, torch.Tensor]:
    """``{"tokens", "logits"}`` of the full model (no exit heads: ``heads_state``, ``threshold`` unused)."""
    tokens, logits = full_generate(GPT.from_state(config, state), prompt, max_new_tokens)
    return {"tokens": tokens, "logits": logits}
