"""KIVI on the paged cache: P13's ``PagedKVCache`` with int8 / int4 pools, usable by the engine.

The block pool stores integers; the block tables, allocator, copy-on-write, fork, truncate and free of
``PagedKVCache`` are reused unchanged. A block of ``block_size`` tokens plays KIVI's group G:

- **values per token**, quantized as they are written: codes (n_layer, nh, num_blocks, bs, hs) uint8 and
  one (scale fp32, zero uint8) per slot. A value's grid depends on that token alone, so it is final on
  arrival: unlike ``cache.KIVICache`` no value residual is kept (the contiguous cache's values equal ours
  once their group fills; before that it holds them in full precision, we already hold them rounded);
- **keys per channel per block**: when a block becomes full its bs keys are quantized with one (scale, zero)
  per (block, head, channel), codes stored token-axis-last (n_layer, nh, num_blocks, hs, bs) as
  ``KIVICache.quantize_keys`` makes them. Until then the keys of a sequence's last, partly filled block sit
  in full precision in a **staging** row of that sequence (KIVI's residual): (n_layer, live sequences, nh,
  bs, hs), grown and shrunk as sequences come and go, counted in ``nbytes``;
- int4 packs two codes per byte (keys along bs, values along hs), so block_size and head_dim must be even.

Attention dequantizes the blocks the batch's tables name, puts each row's staging keys in place of its last
block's (never quantized) key codes, and calls the paged attention path on that temporary pool. Keys of a
block filled by this very forward are already quantized when its queries read them (``KIVICache``'s rule).

Shared blocks are safe: prefix sharing only shares full (hence quantized, immutable) blocks; a fork that
shares a partly filled last block copies the parent's staging row, and copy-on-write copies every pool of
the block. ``truncate`` into a quantized block dequantizes its keys back into staging: they are then the
rounded keys, not the originals, and are quantized again (with the new tokens' range) when the block refills.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from impl.gpt.attention import AttentionFn
from impl.gpt.model import GPT
from impl.kv_quantization.cache import KIVICache
from impl.paged_attention.allocator import BlockAllocator
from impl.paged_attention.fast import PagedKVCache
from impl.ptq.quant import dequantize, pack_int4


class QuantizedPagedKVCache(PagedKVCache):
    """``PagedKVCache`` whose pools hold KIVI int8 / int4 codes (module docstring); same public API."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 allocator: BlockAllocator | None = None, attention=None, bits: int = 8):
        if block_size < 2 or block_size % 2 or head_dim % 2:
            raise ValueError(f"QuantizedPagedKVCache: block_size ({block_size}) and head_dim ({head_dim}) must be "
                             "even (int4 packs two codes per byte) and block_size at least 2 (one key group)")
        self.quantizer = KIVICache(0, bits, block_size)  # KIVI's key / value quantization, G = block_size
        self.bits, self.dtype, self.device = bits, dtype, torch.device(device)
        super().__init__(n_layer, n_head, head_dim, num_blocks, block_size, dtype, device, allocator, attention)
        self.k_stage = torch.zeros(n_layer, 0, n_head, block_size, head_dim, dtype=dtype, device=device)
        self._stage_row: dict[int, int] = {}
        self._stage_source: int | None = None  # the parent while ``fork`` adds its child

    def _make_pools(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> None:
        """Codes, scales and zero points instead of the parent's float pools (``shape`` = (n_layer, n_head,
        num_blocks, block_size, head_dim))."""
        L, nh, nb, bs, hs = shape
        per_byte = 8 // self.bits

        def pool(*dims, dt=torch.uint8):
            return torch.zeros(dims, dtype=dt, device=device)
        self.k_codes = pool(L, nh, nb, hs, bs // per_byte)  # token axis last: one grid per channel
        self.k_scale = pool(L, nh, nb, hs, dt=torch.float32)
        self.k_zero = pool(L, nh, nb, hs)
        self.v_codes = pool(L, nh, nb, bs, hs // per_byte)  # one grid per token (slot)
        self.v_scale = pool(L, nh, nb, bs, dt=torch.float32)
        self.v_zero = pool(L, nh, nb, bs)

    def _copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write copies the block's codes, scales and zero points."""
        for p in self._pools():
            p[:, :, dst] = p[:, :, src]

    @classmethod
    def for_model(cls, model: GPT, num_blocks: int, block_size: int, allocator: BlockAllocator | None = None,
                  bits: int = 8) -> QuantizedPagedKVCache:
        """A ``bits``-bit pool of ``num_blocks`` blocks shaped for ``model``, staging in its dtype, on its device."""
        attn = model.blocks[0].attn
        p = next(model.parameters())
        return cls(model.config.n_layer, attn.n_head, attn.head_dim, num_blocks, block_size, p.dtype, p.device,
                   allocator, bits=bits)

    # --- sequences: the parent's books, plus a staging row per live sequence ---

    def add_sequence(self, seq_id: int, blocks: Sequence[int] = (), cached_tokens: int = 0) -> None:
        """As ``PagedKVCache.add_sequence``; shared prefix blocks must be full (their keys are quantized):
        only ``fork`` may share a partly filled block, whose keys it copies from the parent's staging."""
        if (cached_tokens or len(blocks) * self.block_size) % self.block_size and self._stage_source is None:
            raise ValueError(f"sequence {seq_id}: a partly filled prefix block ({cached_tokens} tokens) keeps its "
                             "keys in another sequence's staging row; share whole blocks or fork that sequence")
        super().add_sequence(seq_id, blocks, cached_tokens)
        source = self._stage_source
        row = (self.k_stage[:, self._stage_row[source]] if source is not None
               else self.k_stage.new_zeros(self.k_stage.shape[:1] + self.k_stage.shape[2:]))
        self.k_stage = torch.cat([self.k_stage, row.unsqueeze(1)], dim=1)
        self._stage_row[seq_id] = self.k_stage.shape[1] - 1
        self._plan = None  # staging rows index the plan's key sources

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares ``parent``'s blocks (copy-on-write) and starts with a copy of its staging keys."""
        self._stage_source = parent
        try:
            super().fork(parent, child)
        finally:
            self._stage_source = None

    def free_sequence(self, seq_id: int) -> None:
        """Drop ``seq_id``'s block references and its staging row (the last row moves into its place)."""
        super().free_sequence(seq_id)
        row, last = self._stage_row.pop(seq_id), self.k_stage.shape[1] - 1
        if row != last:
            moved = next(s for s, r in self._stage_row.items() if r == last)
            self.k_stage[:, row] = self.k_stage[:, last]
            self._stage_row[moved] = row
        self.k_stage = self.k_stage[:, :last].clone()  # clone: the dropped row's bytes go too
        self._plan = None

    def truncate(self, seq_id: int, length: int) -> None:
        """As ``PagedKVCache.truncate``; rolling back into a full (quantized) block dequantizes its keys back into
        the staging row, so they are the rounded keys from then on (module docstring)."""
        old = self._lengths[seq_id]
        super().truncate(seq_id, length)
        tail = length // self.block_size
        if length % self.block_size and old >= (tail + 1) * self.block_size:
            block = self._tables[seq_id][tail]
            self.k_stage[:, self._stage_row[seq_id]] = self._keys(
                self.k_codes[:, :, block], self.k_scale[:, :, block], self.k_zero[:, :, block])
        self._plan = None

    # --- quantize on write, dequantize to attend ---

    def _pools(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero]

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        return pack_int4(q) if self.bits == 4 else q

    def _quantize_key_blocks(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (C, nh, hs, bs) and scale / zero (C, nh, hs) of C full blocks of keys (C, nh, bs, hs)."""
        q, scale, zero = self.quantizer.quantize_keys(k)  # one group per block: (C, nh, 1, hs, bs), (C, nh, 1, hs)
        return self._pack(q[:, :, 0]), scale[:, :, 0], zero[:, :, 0]

    def _keys(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Keys (..., bs, hs) that stored key codes (..., hs, bs[/2]) with scale / zero (..., hs) stand for."""
        q = self.quantizer.codes(codes, self.block_size)
        k = dequantize(q, scale[..., None], zero[..., None].float(), self.quantizer.scheme, self.dtype)
        return k.transpose(-1, -2)

    def _values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Values (..., bs, hs) that stored value codes (..., bs, hs[/2]) with scale / zero (..., bs) stand for."""
        q = self.quantizer.codes(codes, self.k_stage.shape[-1])
        return dequantize(q, scale[..., None], zero[..., None].float(), self.quantizer.scheme, self.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Quantize each row's real new values (B, nh, T, hs) into their slots, its new keys into staging and every
        block they fill into key codes; return causal attention (B, nh, T, hs) over the dequantized blocks and
        staging, by ``self.attention``. ``attend_fn`` is unused: the cache attends itself."""
        if key_valid is not None:
            raise ValueError("the paged cache takes ragged rows through set_batch(n_new), not an attention_mask")
        B, _, T, _ = q.shape
        if B != len(self._batch):
            raise ValueError(f"forward has {B} rows but set_batch named {len(self._batch)} sequences")
        if self._plan is None:
            self._plan = self._make_plan(T, q.device)
        write, _, total, keys = self._plan
        if write is not None:
            blocks, slots, rows, cols = write
            vq, vs, vz = self.quantizer.quantize_values(v[rows, :, cols])  # per token: (N, nh, hs), (N, nh)
            self.v_codes[layer][:, blocks, slots] = self._pack(vq).transpose(0, 1)
            self.v_scale[layer][:, blocks, slots] = vs.transpose(0, 1)
            self.v_zero[layer][:, blocks, slots] = vz.transpose(0, 1)
            self._store_keys(layer, k, keys)
        k_pool, v_pool = self._dequantized_pools(layer, keys)
        return self.attention(q, k_pool, v_pool, keys["table"], total)

    def _store_keys(self, layer: int, k: torch.Tensor, keys: dict) -> None:
        # one source of every key this forward may need: staging rows, then the new keys, each (nh, hs)
        stage = self.k_stage[layer]  # (R, nh, bs, hs)
        src = torch.cat([stage.transpose(1, 2).flatten(0, 1), k.transpose(1, 2).flatten(0, 1).to(stage.dtype)])
        if keys["full_blocks"].numel():
            C, nh, bs, hs = keys["full_blocks"].numel(), stage.shape[1], self.block_size, stage.shape[-1]
            full = src[keys["full_src"]].view(C, bs, nh, hs).transpose(1, 2)  # (C, nh, bs, hs)
            codes, scale, zero = self._quantize_key_blocks(full)
            blocks = keys["full_blocks"]
            self.k_codes[layer][:, blocks] = codes.transpose(0, 1)
            self.k_scale[layer][:, blocks] = scale.transpose(0, 1)
            self.k_zero[layer][:, blocks] = zero.transpose(0, 1)
        if keys["stage_src"].numel():
            stage[keys["stage_rows"], :, keys["stage_slots"]] = src[keys["stage_src"]]

    def _dequantized_pools(self, layer: int, keys: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Temporary pools (B * W, nh, bs, hs) of the blocks the batch reads, row b's block i at b * W + i, its
        partly filled last block's keys taken from staging."""
        rows = keys["blocks"]
        k = self._keys(*(p[layer].index_select(1, rows) for p in (self.k_codes, self.k_scale, self.k_zero)))
        v = self._values(*(p[layer].index_select(1, rows) for p in (self.v_codes, self.v_scale, self.v_zero)))
        k = k.contiguous()  # (nh, B * W, bs, hs)
        if keys["tail_at"].numel():
            k[:, keys["tail_at"]] = self.k_stage[layer][keys["tail_rows"]].transpose(0, 1)
        return k.transpose(0, 1), v.transpose(0, 1)

    def _make_plan(self, T: int, device: torch.device):
        """The parent's plan (write indices, block table, key counts) plus where each key goes (``_key_plan``)."""
        write, table, total = super()._make_plan(T, device)
        return write, table, total, self._key_plan(T, table, device)

    def _key_plan(self, T: int, table: torch.Tensor, device: torch.device) -> dict:
        """Indices, same for every layer, into the key source (staging row r's slot j at r * bs + j, then row b's
        new key t at R * bs + b * T + t): the blocks this forward fills and their bs sources each, the staging
        slots the new keys of a partly filled last block go to, and where each row's staging sits in the
        temporary pools of ``_dequantized_pools``."""
        bs, R, W = self.block_size, self.k_stage.shape[1], table.shape[1]
        plan: dict[str, list[int]] = {k: [] for k in ("full_blocks", "full_src", "stage_rows", "stage_slots",
                                                       "stage_src", "tail_at", "tail_rows")}
        for b, (s, n) in enumerate(zip(self._batch, self._new_counts(T), strict=True)):
            start, end, r = self._lengths[s], self._lengths[s] + n, self._stage_row[s]

            def source(p: int, start=start, r=r, b=b) -> int:  # key of position p: staged before start, else new
                return r * bs + p % bs if p < start else R * bs + b * T + p - start
            for i in range(start // bs, end // bs):  # blocks this forward fills
                plan["full_blocks"].append(self._tables[s][i])
                plan["full_src"] += [source(p) for p in range(i * bs, (i + 1) * bs)]
            if end % bs:  # a partly filled last block: its new keys go to staging, where attention reads them
                for p in range(max(start, end // bs * bs), end):
                    plan["stage_rows"].append(r)
                    plan["stage_slots"].append(p % bs)
                    plan["stage_src"].append(source(p))
                plan["tail_at"].append(b * W + end // bs)
                plan["tail_rows"].append(r)
        out = {k: torch.tensor(x, dtype=torch.long, device=device) for k, x in plan.items()}
        out["blocks"] = table.flatten()
        out["table"] = torch.arange(table.numel(), device=device).view(table.shape)
        return out

    # --- reading back and accounting ---

    def dequantized(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (nh, length, hs) cached for ``seq_id`` in ``layer``, as the values they stand for:
        dequantized blocks, the last partly filled block's keys from staging."""
        n = self._lengths[seq_id]
        blocks = torch.tensor(self._tables[seq_id][:-(-n // self.block_size)], dtype=torch.long, device=self.device)
        k = self._keys(*(p[layer].index_select(1, blocks) for p in (self.k_codes, self.k_scale, self.k_zero)))
        v = self._values(*(p[layer].index_select(1, blocks) for p in (self.v_codes, self.v_scale, self.v_zero)))
        if n % self.block_size:
            k[:, -1] = self.k_stage[layer, self._stage_row[seq_id]]
        nh, hs = k.shape[0], k.shape[-1]
        return k.reshape(nh, -1, hs)[:, :n], v.reshape(nh, -1, hs)[:, :n]

    @property
    def nbytes(self) -> int:
        """Bytes held: key and value codes, their scales and zero points, and the live sequences' staging keys."""
        return sum(p.nbytes for p in self._pools()) + self.k_stage.nbytes
