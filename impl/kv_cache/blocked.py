"""A KV cache that attends over its own storage: keys and values live in fixed-size blocks and
attention walks the blocks with an online softmax, never building a contiguous copy.

This is the model's cache-owned attention seam at work (``impl.gpt.model``, ``KVCacheLike.attend``):
a paged cache (P13) or a quantized one (P15) stores keys and values its own way and computes
attention where they lie. Here the storage is simply a growing list of (B, nh, block, hs) blocks
per layer; the contiguous ``fast.KVCache`` must give the same tokens (P8's check).

Per block, the scores of the visible keys are folded into a running row maximum, the sum of
exponentials and the unnormalised output: FlashAttention's recurrence, the same
``online_softmax_step`` as ``impl.flash_attention.fast``; a block where a row sees nothing
contributes nothing.
"""

from __future__ import annotations

import math

import torch

from impl.flash_attention.fast import online_softmax_step, tile_scores
from impl.gpt.attention import AttentionFn, visibility
from impl.gpt.model import GPT
from impl.kv_cache.fast import SlotPosition, generate

BLOCK_TOKENS = 16


class BlockedKVCache(SlotPosition):
    """Per-layer lists of K/V blocks of ``block_tokens`` slots each; attention runs block by block."""

    def __init__(self, n_layer: int, block_tokens: int = BLOCK_TOKENS):
        self.block_tokens = block_tokens
        self.k: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]
        self.position = 0  # slots already cached (the same for every layer and row)

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_tokens: int) -> BlockedKVCache:
        """An empty cache for ``model`` (blocks are added as tokens arrive)."""
        return cls(model.config.n_layer)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new (B, nh, T, hs) keys/values in slots position .. position + T - 1."""
        B, nh, T, hs = k.shape
        for t in range(T):
            slot = self.position + t
            block, offset = divmod(slot, self.block_tokens)
            if block == len(self.k[layer]):
                shape = (B, nh, self.block_tokens, hs)
                self.k[layer].append(torch.zeros(shape, dtype=k.dtype, device=k.device))
                self.v[layer].append(torch.zeros(shape, dtype=v.dtype, device=v.device))
            self.k[layer][block][:, :, offset] = k[:, :, t]
            self.v[layer][block][:, :, offset] = v[:, :, t]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Store ``k``/``v``; causal attention (B, nh, T, hs) of ``q`` over every cached slot, block
        by block. ``attend_fn`` is not used: this cache computes attention itself."""
        T, hs = q.shape[2], q.shape[3]
        self._write(layer, k, v)
        S = self.position + T
        visible = visibility(T, S, key_valid, True, q.device)  # (T, S) or (B, 1, T, S)
        qf = q.float()
        # finite start: a row whose first blocks are all padding folds in exp(-inf) = 0, never NaN
        m = torch.full(q.shape[:3], torch.finfo(torch.float32).min, device=q.device)  # running row maximum
        denom = torch.zeros(q.shape[:3], device=q.device)
        acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        for j, (kb, vb) in enumerate(zip(self.k[layer], self.v[layer], strict=True)):
            s0 = j * self.block_tokens
            s1 = min(s0 + self.block_tokens, S)
            if s0 >= S:
                break
            s = tile_scores(qf, kb[:, :, : s1 - s0].float(), 1.0 / math.sqrt(hs), visible[..., s0:s1])
            m, denom, acc = online_softmax_step(m, denom, acc, s, vb[:, :, : s1 - s0].float())
        return (acc / denom.unsqueeze(-1)).to(q.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the blocks."""
        return sum(t.nbytes for blocks in self.k + self.v for t in blocks)


def greedy(config: dict, state: dict[str, torch.Tensor], prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Same contract as ``naive.greedy``, through the blocked cache."""
    return generate(GPT.from_state(config, state), prompt, max_new_tokens, make_cache=BlockedKVCache.for_model)
