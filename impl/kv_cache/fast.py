"""Generation with a KV cache: keys and values of past tokens are computed once and kept.

The cache is allocated once for the whole generation (no per-step ``torch.cat`` reallocation),
so its memory is bounded and known up front:
``2 * layers * batch * max_tokens * heads * head_dim * bytes_per_element``.

``decode`` is the generation API later projects (engine, server) build on: ragged prompts
(left-padded, with an attention mask), stop ids with per-row finished flags, temperature /
top-k / top-p from a seeded generator, and the next-token probabilities. ``generate`` is P8's
plain contract over it.

Layout notes for the engine. Rows share slot indices: slot ``s`` of every row is written by the
same forward, and a row's position is the number of its real tokens (the attention mask), so
rows of different lengths coexist. ``truncate(n)`` rolls every row back to ``n`` slots (a
rejected speculative draft): the slots after ``n`` are overwritten by the next write and never
read before, so nothing is copied. Copy-on-write sharing of a prompt between rows needs blocks
that several rows point to: that is the paged cache's job (P13), through ``attend``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from impl.gpt.attention import AttentionFn
from impl.gpt.model import GPT, KVCacheLike, call_attention
from impl.gpt.sampling import next_token_probs, sample_next


class ContiguousAttend:
    """``attend`` for a cache that hands out contiguous keys/values: store them (``update``), then
    run the model's own attention backend over them."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Store the new keys/values of ``layer``; attention of ``q`` over all of them."""
        k_all, v_all = self.update(layer, k, v)
        return call_attention(attend_fn, q, k_all, v_all, key_valid)


class SlotPosition:
    """The write position every cache of this package shares: slots filled so far, moved forward by
    the model after each forward and back by a rollback."""

    position: int

    def advance(self, n_tokens: int) -> None:
        self.position += n_tokens

    def truncate(self, position: int) -> None:
        """Forget every slot from ``position`` on (rollback): the next token is written there, so the
        forgotten slots are overwritten before they are ever read again."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot truncate a cache of {self.position} tokens to {position}")
        self.position = position


class KVCache(SlotPosition, ContiguousAttend):
    """Pre-allocated per-layer K/V buffers (layers, B, nh, max_tokens, hs) and a write position."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        head_dim: int,
        max_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layer, batch, n_head, max_tokens, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_tokens = max_tokens
        self.position = 0  # slots already cached (the same for every layer and row)

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_tokens: int) -> KVCache:
        attn = model.blocks[0].attn
        p = next(model.parameters())
        return cls(model.config.n_layer, batch, attn.n_head, attn.head_dim, max_tokens, p.dtype, p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, nh, T, hs) keys/values after the cached ones; return all of them."""
        end = self.position + k.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} tokens > max_tokens {self.max_tokens}")
        self.k[layer, :, :, self.position : end] = k  # incremental update, in place
        self.v[layer, :, :, self.position : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # views: no copy

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache buffers."""
        return self.k.nbytes + self.v.nbytes


@dataclass
class Generation:
    """What ``decode`` returns."""

    tokens: torch.Tensor  # (B, T + n): the prompt, then n generated ids; pad_id after a row's stop id
    attention_mask: torch.Tensor  # (B, T + n): 1 for real tokens (prompt and generated), 0 for padding
    finished: torch.Tensor  # (B,) bool: the row produced one of the stop ids
    probs: torch.Tensor | None  # (B, n, vocab): the distribution each new token was drawn from
    prompt_len: int  # T

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated ids (B, n) only."""
        return self.tokens[:, self.prompt_len:]


def pad_prompts(prompts: Sequence[Sequence[int] | torch.Tensor], pad_id: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts of different lengths into one batch: ids (B, T) and attention mask (B, T).

    Left, so every row's next token is written to the same slot: the last column."""
    if not prompts:
        raise ValueError("no prompts")
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def decode(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    return_probs: bool = False,
    make_cache: Callable[[GPT, int, int], KVCacheLike] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` after the prompts ``idx`` (B, T), through a KV cache.

    ``attention_mask`` (B, T) marks real prompt tokens of a ragged batch (``pad_prompts``). A row
    that draws one of ``stop_ids`` is finished: its later tokens are ``pad_id`` (mask 0); generation
    ends early once every row is finished. Sampling is seeded by ``generator``; ``temperature == 0``
    is greedy. ``make_cache(model, batch, max_tokens)`` builds the cache (default ``KVCache``).
    """
    B, T = idx.shape
    total = T + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt + new tokens = {total} exceeds block_size {model.config.block_size}")
    cache = (make_cache or KVCache.for_model)(model, B, total)
    mask = attention_mask.long() if attention_mask is not None else None
    stops = torch.as_tensor(list(stop_ids), dtype=torch.long, device=idx.device)
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    logits = model(idx, cache=cache, attention_mask=mask)  # prefill: the prompt in one forward
    out, probs, real = [idx], [], [mask if mask is not None else torch.ones_like(idx)]
    for step in range(max_new_tokens):
        last = logits[:, -1, :]
        if return_probs:
            probs.append(next_token_probs(last, temperature, top_k, top_p))
        next_id = sample_next(last, temperature, top_k, generator, top_p)  # (B, 1)
        if stop_ids:  # (no per-step bookkeeping, and no device sync, without stop ids)
            next_id = next_id.masked_fill(finished.unsqueeze(1), pad_id)
            real.append((~finished).long().unsqueeze(1))
            finished |= torch.isin(next_id.squeeze(1), stops)
        else:
            real.append(torch.ones_like(next_id))
        out.append(next_id)
        if step + 1 == max_new_tokens or (stop_ids and bool(finished.all())):
            break
        if mask is not None:
            mask = torch.cat([mask, real[-1]], dim=1)
        logits = model(next_id, cache=cache, attention_mask=mask)  # (B, 1, vocab): only the new token
    return Generation(torch.cat(out, dim=1), torch.cat(real, dim=1), finished,
                      torch.stack(probs, dim=1) if return_probs else None, T)


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    make_cache: Callable[[GPT, int, int], KVCacheLike] | None = None,
) -> torch.Tensor:
    """Same contract as ``naive.generate``: (B, T) prompt -> (B, T + max_new_tokens) ids.

    ``make_cache(model, batch, max_tokens)`` builds the cache (default: the pre-allocated
    ``KVCache``; ``impl.kv_cache.concat`` passes its growing one through here).
    """
    return decode(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                  make_cache=make_cache).tokens


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Same contract as ``naive.greedy``, through the KV cache."""
    return generate(GPT.from_state(config, state), prompt, max_new_tokens)


def ragged_greedy(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[torch.Tensor],
                  max_new_tokens: int) -> torch.Tensor:
    """Greedy new tokens (B, max_new_tokens) for prompts of different lengths, in ONE left-padded
    batch through the cache (``naive.ragged_greedy`` runs each prompt alone)."""
    idx, mask = pad_prompts(prompts)
    return decode(GPT.from_state(config, state), idx, max_new_tokens, attention_mask=mask).new_tokens


@torch.no_grad()
def greedy_with_rejected_drafts(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor,
                                max_new_tokens: int, n_draft: int = 3,
                                make_cache: Callable[[GPT, int, int], KVCacheLike] | None = None) -> torch.Tensor:
    """Greedy decoding where every step first runs ``n_draft`` wrong guesses through the cache and
    rolls them back (``truncate``), as speculative decoding does with rejected drafts. It must give
    exactly ``greedy``'s tokens: a rollback that leaves one stale entry changes them. The cache
    (``make_cache``, default ``KVCache``) needs ``truncate(position)``."""
    model = GPT.from_state(config, state)
    B, T = prompt.shape
    cache = (make_cache or KVCache.for_model)(model, B, T + max_new_tokens + n_draft)
    gen = torch.Generator().manual_seed(0)
    logits = model(prompt, cache=cache)
    out = [prompt]
    for step in range(max_new_tokens):
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        out.append(next_id)
        if step + 1 == max_new_tokens:
            break
        keep = cache.position
        n = min(n_draft, model.config.block_size - keep)  # drafts never run past the context
        drafts = torch.randint(model.config.vocab_size, (B, n), generator=gen).to(prompt.device)
        if n > 0:
            model(drafts, cache=cache)  # the drafts' keys/values land in the cache ...
            cache.truncate(keep)  # ... and are rejected
        logits = model(next_id, cache=cache)
    return torch.cat(out, dim=1)
