"""Generation with a KV cache: keys and values of past tokens are computed once and kept.

The cache is allocated once for the whole generation (no per-step ``torch.cat`` reallocation),
so its memory is bounded and known up front:
``2 * layers * batch * max_tokens * heads * head_dim * bytes_per_element``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from impl.gpt.model import GPT, KVCacheLike
from impl.gpt.sampling import sample_next


class KVCache:
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
        self.position = 0  # tokens already cached (the same for every layer)

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_tokens: int) -> KVCache:
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch, c.n_head, c.n_embd // c.n_head, max_tokens, p.dtype, p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, nh, T, hs) keys/values after the cached ones; return all of them."""
        end = self.position + k.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"KV cache full: {end} tokens > max_tokens {self.max_tokens}")
        self.k[layer, :, :, self.position : end] = k  # incremental update, in place
        self.v[layer, :, :, self.position : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # views: no copy

    def advance(self, n_tokens: int) -> None:
        self.position += n_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache buffers."""
        return self.k.nbytes + self.v.nbytes


@torch.no_grad()
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
    B, T = idx.shape
    total = T + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompt + new tokens = {total} exceeds block_size {model.config.block_size}")
    cache = (make_cache or KVCache.for_model)(model, B, total)
    logits = model(idx, cache=cache)  # prefill: the prompt in one forward
    out = [idx]
    for step in range(max_new_tokens):
        next_id = sample_next(logits[:, -1, :], temperature, top_k, generator)
        out.append(next_id)
        if step + 1 < max_new_tokens:
            logits = model(next_id, cache=cache)  # (B, 1, vocab): only the new token
    return torch.cat(out, dim=1)


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Same contract as ``naive.greedy``, through the KV cache."""
    return generate(GPT.from_state(config, state), prompt, max_new_tokens)
