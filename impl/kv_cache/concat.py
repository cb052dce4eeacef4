"""The textbook growing KV cache: each layer's keys and values grow by ``torch.cat`` every step.

This is the cache most tutorials write first, kept as the naive side of the memory claim: every
step allocates a new (B, nh, S + 1, hs) tensor per layer for K and for V, copies the old one into
it and frees the old one, so the work per step grows with S and the allocator sees a stream of
ever larger blocks. ``fast.KVCache`` allocates the whole cache once instead.
"""

from __future__ import annotations

import torch

from impl.gpt.model import GPT
from impl.kv_cache import fast


class ConcatKVCache(fast.ContiguousAttend):
    """Per-layer K/V tensors (B, nh, S, hs) that ``update`` replaces by their concatenation with
    the new tokens' keys and values."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.position = 0  # tokens already cached (the same for every layer)

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_tokens: int) -> ConcatKVCache:
        """An empty cache for ``model`` (batch and max_tokens are not needed: it grows)."""
        return cls(model.config.n_layer)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new (B, nh, T, hs) keys/values to the cached ones; return all of them."""
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.contiguous(), v.contiguous()
        else:
            # reallocates (B, nh, S + T, hs); no other reference keeps the old tensor, so it is
            # freed as soon as it is replaced: K's old copy is gone before V's is made
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def advance(self, n_tokens: int) -> None:
        self.position += n_tokens

    def truncate(self, position: int) -> None:
        """Forget every token from ``position`` on (rollback): the tensors shrink to it."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot truncate a cache of {self.position} tokens to {position}")
        self.k = [t[:, :, :position] if t is not None else None for t in self.k]
        self.v = [t[:, :, :position] if t is not None else None for t in self.v]
        self.position = position

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors now."""
        return sum(t.nbytes for t in self.k + self.v if t is not None)


def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``fast.generate`` with the growing cache: (B, T) prompt -> (B, T + max_new_tokens) ids."""
    return fast.generate(model, idx, max_new_tokens, temperature, top_k, generator,
                         make_cache=ConcatKVCache.for_model)


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Same contract as ``naive.greedy``, through the growing cache."""
    return generate(GPT.from_state(config, state), prompt, max_new_tokens)
