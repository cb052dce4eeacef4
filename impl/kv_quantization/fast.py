"""KIVI cache with attention in the integer domain: scores and outputs straight from the codes.

With keys quantized per channel, key ``j`` of group ``g`` in channel ``d`` stands for
``(c[g,d,j] - z[g,d]) * s[g,d]``, so a query's score against it is

    q . k_j = sum_d (q_d s[g,d]) c[g,d,j]  -  sum_d (q_d s[g,d]) z[g,d]

the per-channel scales fold into the query once per group (``q_s = q * s``), the dot product runs
against the integer codes, and the zero points cost one correction term per group and query. The
cache is never dequantized. Values are per token: ``v_j = (c[j,:] - z_j) * s_j``, so

    sum_j p_j v_j = sum_j (p_j s_j) c[j,:]  -  sum_j p_j s_j z_j

the per-token scales fold into the attention probabilities. The softmax runs in fp32. The residual
(the < G newest tokens, full precision) is attended as usual and joined before the softmax.

On CPU torch offers no int8 x fp32 matmul, so the codes are widened to fp32 inside the matmul's
operand (``.float()`` on the uint8 codes): the arithmetic is the integer-domain one above, the
storage never leaves int8/int4, but each step still reads every code once into a float buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from impl.gpt.attention import AttentionFn, visibility
from impl.kv_quantization.cache import KIVICache, Layer
from impl.kv_quantization.naive import stream_into


class QuantizedKVCache(KIVICache):
    """KIVI storage whose ``attend`` computes attention against the integer codes (module docstring)."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Store the new (B, nh, T, hs) keys/values; causal attention (B, nh, T, hs) of ``q`` over the cache
        (``attend_fn`` is unused: the cache attends itself, following ``visibility`` for padding)."""
        self.append(layer, k, v)
        st = self.layers[layer]
        T, hs = q.shape[2], q.shape[3]
        qf = q.float()
        scores = [] if st.k_codes is None else [self.key_scores(st, qf)]
        scores.append(qf @ st.k_res.float().transpose(-2, -1))  # residual: (B, nh, T, r)
        att = torch.cat(scores, dim=-1) / math.sqrt(hs)  # (B, nh, T, S)
        mask = visibility(T, att.shape[-1], key_valid, True, q.device)
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)  # fp32
        n_q = self.quantized_tokens(layer)
        y = att[..., n_q:] @ st.v_res.float()  # residual values: (B, nh, T, hs)
        if n_q:
            y = y + self.value_mix(st, att[..., :n_q])
        return y.to(q.dtype)

    def key_scores(self, st: Layer, q: torch.Tensor) -> torch.Tensor:
        """Unscaled scores q . k (B, nh, T, groups * G) of fp32 queries (B, nh, T, hs) against the key codes."""
        B, nh, T, _ = q.shape
        groups, G = st.k_codes.shape[2], self.group_size
        kc = self.codes(st.k_codes, G).float()  # (B, nh, groups, hs, G)
        q_s = q[:, :, None] * st.k_scale[:, :, :, None, :]  # per-channel key scales folded into q: (B, nh, g, T, hs)
        s_int = q_s @ kc  # scores against the codes: (B, nh, g, T, G)
        s_int = s_int - (q_s * st.k_zero[:, :, :, None, :]).sum(-1, keepdim=True)  # zero-point correction
        return s_int.permute(0, 1, 3, 2, 4).reshape(B, nh, T, groups * G)

    def value_mix(self, st: Layer, p: torch.Tensor) -> torch.Tensor:
        """sum_j p_j v_j (B, nh, T, hs) over the quantized values, for probabilities ``p`` (B, nh, T, n_q)."""
        p_s = p * st.v_scale[:, :, None, :]  # per-token value scales folded into p: (B, nh, T, n_q)
        y = p_s @ self.codes(st.v_codes, st.v_res.shape[-1]).float()
        return y - (p_s * st.v_zero[:, :, None, :]).sum(-1, keepdim=True)  # zero-point correction


def attention_stream(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunks: Sequence[int],
                     bits: int, group_size: int) -> torch.Tensor:
    """Same contract as ``naive.attention_stream``, through the integer-domain attention."""
    return stream_into(QuantizedKVCache(1, bits, group_size), keys, values, chunks, queries)
