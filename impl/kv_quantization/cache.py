"""KIVI's quantized KV cache storage: keys per channel, values per token, a full-precision residual.

Keys and values arrive token by token (or in chunks) and are quantized *dynamically*: new tokens
first land in a full-precision **residual**; as soon as it holds ``group_size`` (G) tokens those G
tokens are quantized and moved into the integer store (Liu et al., 2024, "KIVI"):

- keys **per channel**: one (scale, zero) per channel over a group of G tokens. Key outliers sit in a
  few fixed channels, so a channel's scale fits all its tokens. quant.py groups run along the last
  dim, so a key group is stored token-axis-last, codes (B, nh, groups, hs, G);
- values **per token**: one (scale, zero) per token over the head dim, codes (B, nh, tokens, hs).
  A value row is mixed by the attention weights of one query, so its error stays per token;
- asymmetric grids (KIVI's choice): codes 0 .. 2^bits - 1 with a zero point, scales fp32 (quant.py's
  convention) and zero points stored as uint8 codes (they are integers in the code range);
- int4 codes are packed two per byte with ``pack_int4`` (keys along G, values along hs), so the
  bytes counted are the bytes held.

Storage grows as groups fill (one ``torch.cat`` per G tokens, not per token), so ``nbytes`` is the
exact size of what the cache holds: codes + scales + zero points + the residual, for every layer.
The attention over this storage is ``naive.py``'s (dequantize, then the model's attention) or
``fast.py``'s (scores against the integer codes).
"""

from __future__ import annotations

import torch

from impl.gpt.model import GPT
from impl.kv_cache.fast import SlotPosition
from impl.ptq.quant import Scheme, dequantize, pack_int4, qparams, quantize, unpack_int4


class Layer:
    """One layer's store: quantized key groups, quantized value rows, and the fp residual."""

    def __init__(self) -> None:
        self.k_codes: torch.Tensor | None = None  # (B, nh, groups, hs, G) uint8 (int4: G/2 packed)
        self.k_scale: torch.Tensor | None = None  # (B, nh, groups, hs) fp32
        self.k_zero: torch.Tensor | None = None  # (B, nh, groups, hs) uint8
        self.v_codes: torch.Tensor | None = None  # (B, nh, groups * G, hs) uint8 (int4: hs/2 packed)
        self.v_scale: torch.Tensor | None = None  # (B, nh, groups * G) fp32
        self.v_zero: torch.Tensor | None = None  # (B, nh, groups * G) uint8
        self.k_res: torch.Tensor | None = None  # (B, nh, r, hs), r < G, the model's dtype
        self.v_res: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds."""
        return [t for t in vars(self).values() if t is not None]


def _cat(old: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=dim)


class KIVICache(SlotPosition):
    """``KVCacheLike`` storage of KIVI-quantized keys/values (module docstring); subclasses attend."""

    def __init__(self, n_layer: int, bits: int = 8, group_size: int = 32, max_tokens: int | None = None):
        if bits not in (4, 8):
            raise ValueError(f"KIVICache: bits must be 8 or 4, got {bits}")
        if group_size < 2 or group_size % 2:
            raise ValueError(f"KIVICache: group_size must be an even number >= 2, got {group_size}")
        self.bits, self.group_size, self.max_tokens = bits, group_size, max_tokens
        self.scheme = Scheme(bits=bits, symmetric=False)  # one group per row: per channel / per token
        self.layers = [Layer() for _ in range(n_layer)]
        self.position = 0

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_tokens: int, bits: int = 8, group_size: int = 32) -> KIVICache:
        """A cache for ``model`` (``decode``'s ``make_cache`` signature; batch and heads come with the keys)."""
        return cls(model.config.n_layer, bits, group_size, max_tokens)

    @classmethod
    def factory(cls, bits: int = 8, group_size: int = 32):
        """``make_cache(model, batch, max_tokens)`` for ``impl.kv_cache.fast.decode`` with these settings."""
        return lambda model, batch, max_tokens: cls.for_model(model, batch, max_tokens, bits, group_size)

    # --- dynamic quantization as tokens arrive ---

    def _codes(self, q: torch.Tensor) -> torch.Tensor:
        return pack_int4(q) if self.bits == 4 else q  # int4: two codes per byte along the last dim

    def codes(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        """Unpacked uint8 codes (..., n) of stored codes (a no-op for int8)."""
        return unpack_int4(packed, n, signed=False) if self.bits == 4 else packed

    def quantize_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (B, nh, groups, hs, G), scale and zero (B, nh, groups, hs) of full key groups (B, nh, groups*G, hs)."""
        B, nh, n, hs = k.shape
        by_channel = k.reshape(B, nh, n // self.group_size, self.group_size, hs).transpose(-1, -2)  # token axis last
        scale, zero = qparams(by_channel, self.scheme)
        q = quantize(by_channel, scale, zero, self.scheme)
        return q, scale[..., 0], zero[..., 0].to(torch.uint8)

    def quantize_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (B, nh, n, hs), scale and zero (B, nh, n) of value rows (B, nh, n, hs): one grid per token."""
        scale, zero = qparams(v, self.scheme)
        q = quantize(v, scale, zero, self.scheme)
        return q, scale[..., 0], zero[..., 0].to(torch.uint8)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new (B, nh, T, hs) keys/values of ``layer``: into the residual, then every full group of G
        residual tokens is quantized and moved to the integer store."""
        if self.max_tokens is not None and self.position + k.shape[2] > self.max_tokens:
            raise ValueError(f"quantized KV cache full: {self.position + k.shape[2]} tokens > max_tokens "
                             f"{self.max_tokens}")
        st = self.layers[layer]
        st.k_res, st.v_res = _cat(st.k_res, k, 2), _cat(st.v_res, v, 2)
        full = st.k_res.shape[2] // self.group_size * self.group_size
        if full == 0:
            return
        kq, ks, kz = self.quantize_keys(st.k_res[:, :, :full])
        vq, vs, vz = self.quantize_values(st.v_res[:, :, :full])
        st.k_codes, st.k_scale, st.k_zero = _cat(st.k_codes, self._codes(kq), 2), _cat(st.k_scale, ks, 2), \
            _cat(st.k_zero, kz, 2)
        st.v_codes, st.v_scale, st.v_zero = _cat(st.v_codes, self._codes(vq), 2), _cat(st.v_scale, vs, 2), \
            _cat(st.v_zero, vz, 2)
        # clone: a view would keep the whole old residual alive (and counted) behind the short tail
        st.k_res, st.v_res = st.k_res[:, :, full:].clone(), st.v_res[:, :, full:].clone()

    # --- reading back ---

    def quantized_tokens(self, layer: int) -> int:
        """Tokens of ``layer`` held as integer codes (a multiple of G)."""
        st = self.layers[layer]
        return 0 if st.v_scale is None else st.v_scale.shape[2]

    def dequantized(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached key/value of ``layer`` as the values they stand for, (B, nh, S, hs) each, in the
        residual's dtype: dequantized groups, then the residual."""
        st = self.layers[layer]
        if st.k_codes is None:
            return st.k_res, st.v_res
        hs = st.k_res.shape[-1]
        kq = self.codes(st.k_codes, self.group_size)  # (B, nh, groups, hs, G)
        k = dequantize(kq, st.k_scale[..., None], st.k_zero[..., None].float(), self.scheme, st.k_res.dtype)
        B, nh, groups = k.shape[:3]
        k = k.transpose(-1, -2).reshape(B, nh, groups * self.group_size, hs)
        vq = self.codes(st.v_codes, hs)
        v = dequantize(vq, st.v_scale[..., None], st.v_zero[..., None].float(), self.scheme, st.v_res.dtype)
        return torch.cat([k, st.k_res], dim=2), torch.cat([v, st.v_res], dim=2)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: codes + scales + zero points + the residual, every layer."""
        return sum(t.nbytes for st in self.layers for t in st.tensors())
