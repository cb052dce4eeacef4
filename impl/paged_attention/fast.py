"""Paged KV cache: every sequence's keys and values live in fixed-size blocks of one shared pool.

A contiguous cache reserves a sequence's maximum length up front; most of it is never used (the
output length is unknown when the request arrives). Here a sequence holds only the blocks its tokens
fill, found through its block table (logical block i -> physical block id), so the only reserved but
unused slots are those at the end of each sequence's last block (Kwon et al., 2023).

``PagedKVCache`` plugs into the model's cache seam (``KVCacheLike.attend``): rows of a forward are
sequences (``set_batch``), each at its own length; new keys/values are scattered into their blocks,
then ``paged_attention`` reads the blocks in place of a contiguous K/V.

``paged_attention`` here is the vectorized torch path; ``naive.paged_attention`` gathers row by row
and ``triton_kernel.paged_attention`` walks the blocks in a kernel. All three share one contract:

    q (B, nh, T, hs); k_pool, v_pool (num_blocks, nh, block_size, hs) of one layer;
    block_tables (B, max_blocks) long (entries past a row's blocks: any valid id);
    lengths (B,) keys of each row INCLUDING its T new ones (lengths >= T);
    query t of row b sits at position lengths[b] - T + t and sees keys 0 .. that position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from impl.gpt.attention import AttentionFn
from impl.gpt.model import GPT
from impl.paged_attention.allocator import BlockAllocator


def visible_keys(lengths: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """Boolean (B, 1, T, S): key j is visible to query t of row b when j <= lengths[b] - T + t."""
    query_pos = lengths[:, None] - T + torch.arange(T, device=lengths.device)  # (B, T)
    return (torch.arange(S, device=lengths.device) <= query_pos[:, :, None])[:, None]


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Causal attention (B, nh, T, hs) of ``q`` over each row's paged keys/values (module docstring)."""
    B, nh, T, hs = q.shape
    bs = k_pool.shape[2]
    # only as many table columns as the longest row fills: no work on blocks nobody reads
    n_blocks = -(-int(lengths.max()) // bs)
    table = block_tables[:, :n_blocks]
    # one index_select per pool along the block dimension of its head-major view (nh, num_blocks, bs, hs):
    # the rows' blocks land in (nh, B * n_blocks, bs, hs) order, which is already (B, nh, n_blocks * bs, hs)
    # up to a transpose, so no second copy. PagedKVCache stores its pools head-major, making the view
    # contiguous (3x faster decode attention here than gathering (B, n_blocks, nh, bs, hs) and permuting)
    rows = table.flatten()
    k = torch.index_select(k_pool.transpose(0, 1), 1, rows).view(nh, B, n_blocks * bs, hs).transpose(0, 1)
    v = torch.index_select(v_pool.transpose(0, 1), 1, rows).view(nh, B, n_blocks * bs, hs).transpose(0, 1)
    # one fused SDPA call; each row's ragged length and causal offset live in a single boolean mask
    mask = visible_keys(lengths, T, n_blocks * bs)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)


class PagedKVCache:
    """``KVCacheLike`` over one block pool shared by many sequences (see the module docstring)."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 allocator: BlockAllocator | None = None, attention=None):
        self.allocator = allocator or BlockAllocator(num_blocks, block_size)
        if (self.allocator.num_blocks, self.allocator.block_size) != (num_blocks, block_size):
            raise ValueError(f"allocator has {self.allocator.num_blocks} blocks of {self.allocator.block_size}; "
                             f"the cache was asked for {num_blocks} of {block_size}")
        self.block_size = block_size
        # stored head-major (n_layer, n_head, num_blocks, block_size, head_dim) so that one layer's pools, seen
        # as the contract's (num_blocks, n_head, block_size, head_dim), gather without a permuting copy
        # (paged_attention); k_pool / v_pool are those views, (n_layer, num_blocks, n_head, block_size, head_dim)
        self._make_pools((n_layer, n_head, num_blocks, block_size, head_dim), dtype, device)
        self.attention = attention or paged_attention  # naive / triton paths plug in here
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._batch: list[int] = []
        self._n_new: list[int] | None = None
        self._plan = None  # per-forward write indices, block table and key counts (every layer uses them)

    @classmethod
    def for_model(cls, model: GPT, num_blocks: int, block_size: int,
                  allocator: BlockAllocator | None = None) -> PagedKVCache:
        """A pool of ``num_blocks`` blocks shaped for ``model``, in its dtype, on its device."""
        attn = model.blocks[0].attn
        p = next(model.parameters())
        return cls(model.config.n_layer, attn.n_head, attn.head_dim, num_blocks, block_size, p.dtype, p.device,
                   allocator)

    # --- sequences and their block tables ---

    def add_sequence(self, seq_id: int, blocks: Sequence[int] = (), cached_tokens: int = 0) -> None:
        """A new sequence, optionally starting on prefix ``blocks`` it already owns a reference to,
        holding ``cached_tokens`` tokens (default: all of them full)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        cached_tokens = cached_tokens or len(blocks) * self.block_size
        if -(-cached_tokens // self.block_size) != len(blocks):
            raise ValueError(f"{cached_tokens} cached tokens do not fill {len(blocks)} blocks of {self.block_size}")
        self._tables[seq_id] = list(blocks)
        self._lengths[seq_id] = cached_tokens

    def fork(self, parent: int, child: int) -> None:
        """``child`` starts as a copy of ``parent`` sharing its filled blocks (copy-on-write)."""
        n = -(-self._lengths[parent] // self.block_size)
        shared = self._tables[parent][:n]
        for block in shared:
            self.allocator.incref(block)
        self.add_sequence(child, shared, self._lengths[parent])

    def blocks_needed(self, seq_id: int, n_tokens: int) -> int:
        """Free blocks ``reserve(seq_id, n_tokens)`` would take: new ones past the table, plus a copy of a
        shared last block about to be written."""
        table, length = self._tables[seq_id], self._lengths[seq_id]
        grow = max(0, -(-(length + n_tokens) // self.block_size) - len(table))
        # the partly filled last block is written next: shared or cached, it must be copied first
        tail = length // self.block_size
        copy = n_tokens > 0 and length % self.block_size != 0 and not self.allocator.writable(table[tail])
        return grow + copy

    def can_reserve(self, needs: dict[int, int]) -> bool:
        """Whether ``reserve(seq_id, n)`` for every ``seq_id: n`` of ``needs`` would fit together."""
        return sum(self.blocks_needed(s, n) for s, n in needs.items()) <= self.allocator.num_free

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Room for ``n_tokens`` more tokens of ``seq_id``; ``NoFreeBlocks`` allocates nothing."""
        need = self.blocks_needed(seq_id, n_tokens)
        new = self.allocator.allocate_many(need)  # all or none
        table, length = self._tables[seq_id], self._lengths[seq_id]
        tail = length // self.block_size
        if n_tokens > 0 and length % self.block_size != 0 and not self.allocator.writable(table[tail]):
            copy = new.pop()  # copy-on-write: this sequence's own copy of the shared last block
            self._copy_block(table[tail], copy)
            self.allocator.free(table[tail])
            table[tail] = copy
        table.extend(new)

    def _make_pools(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> None:
        """The block storage, ``shape`` = (n_layer, n_head, num_blocks, block_size, head_dim) (a quantized
        cache stores codes and scales instead: impl/kv_quantization/paged.py)."""
        self.k_pool = torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)
        self.v_pool = torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)

    def _copy_block(self, src: int, dst: int) -> None:
        """Copy-on-write: everything block ``src`` stores, into block ``dst``."""
        self.k_pool[:, dst] = self.k_pool[:, src]
        self.v_pool[:, dst] = self.v_pool[:, src]

    def length(self, seq_id: int) -> int:
        """Tokens cached for ``seq_id``."""
        return self._lengths[seq_id]

    def block_table(self, seq_id: int) -> list[int]:
        """Physical block ids of ``seq_id``, logical block order (reserved ones included)."""
        return list(self._tables[seq_id])

    def sequences(self) -> list[int]:
        """Ids of the sequences in the cache."""
        return list(self._tables)

    def truncate(self, seq_id: int, length: int) -> None:
        """Roll ``seq_id`` back to ``length`` tokens; whole blocks past it go back to the allocator."""
        if not 0 <= length <= self._lengths[seq_id]:
            raise ValueError(f"cannot truncate sequence {seq_id} of {self._lengths[seq_id]} tokens to {length}")
        table = self._tables[seq_id]
        keep = -(-length // self.block_size)
        for block in table[keep:]:
            self.allocator.free(block)
        del table[keep:]
        self._lengths[seq_id] = length

    def free_sequence(self, seq_id: int) -> None:
        """Drop every reference ``seq_id`` holds and forget it."""
        for block in self._tables.pop(seq_id):
            self.allocator.free(block)
        del self._lengths[seq_id]
        if seq_id in self._batch:
            self._batch, self._plan = [], None

    # --- the model's cache seam ---

    def set_batch(self, seq_ids: Sequence[int], n_new: Sequence[int] | None = None) -> None:
        """Rows of the next forward: row b is ``seq_ids[b]`` with ``n_new[b]`` real new tokens (the rest
        of the T columns right padding, never written); None: all T are real. Reserve first."""
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in the batch {list(seq_ids)}")
        unknown = [s for s in seq_ids if s not in self._tables]
        if unknown:
            raise ValueError(f"sequences {unknown} are not in the cache: add_sequence first")
        if n_new is not None and len(n_new) != len(seq_ids):
            raise ValueError(f"{len(n_new)} n_new for {len(seq_ids)} sequences")
        self._batch = list(seq_ids)
        self._n_new = None if n_new is None else list(n_new)
        self._plan = None

    @property
    def position(self) -> int:
        """The longest length in the batch. GPT derives positions from it only when no position_ids are
        passed, which is right for rows of equal length only: pass position_ids for ragged rows."""
        return max((self._lengths[s] for s in self._batch), default=0)

    def _new_counts(self, T: int) -> list[int]:
        n_new = self._n_new if self._n_new is not None else [T] * len(self._batch)
        if any(not 0 <= n <= T for n in n_new):
            raise ValueError(f"n_new {n_new} must lie in 0 .. {T} (the forward's tokens per row)")
        return n_new

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Write each row's real new keys/values (B, nh, T, hs) into its blocks at slots length ..
        length + n_new - 1; return causal attention (B, nh, T, hs) of each row's T queries over its
        length + T keys, by ``self.attention``. ``attend_fn`` is unused: the cache attends itself."""
        if key_valid is not None:
            raise ValueError("the paged cache takes ragged rows through set_batch(n_new), not an attention_mask")
        B, _, T, _ = q.shape
        if B != len(self._batch):
            raise ValueError(f"forward has {B} rows but set_batch named {len(self._batch)} sequences")
        if self._plan is None:  # the same rows, slots and tables for every layer: built once per forward
            self._plan = self._make_plan(T, q.device)
        write, table, total = self._plan
        if write is not None:
            # one scatter per pool: (N, nh, hs) new vectors to (block, :, slot)
            blocks, slots, rows, cols = write
            self.k_pool[layer][blocks, :, slots] = k[rows, :, cols].to(self.k_pool.dtype)
            self.v_pool[layer][blocks, :, slots] = v[rows, :, cols].to(self.v_pool.dtype)
        return self.attention(q, self.k_pool[layer], self.v_pool[layer], table, total)

    def _slot(self, seq_id: int, position: int) -> tuple[int, int]:
        """(physical block, slot in it) holding token ``position`` of ``seq_id``."""
        logical, slot = divmod(position, self.block_size)
        return self._tables[seq_id][logical], slot

    def _make_plan(self, T: int, device: torch.device):
        """Check the batch's room, then the write indices, the block table (B, width) and the key counts (B,)."""
        n_new = self._new_counts(T)
        lengths = [self._lengths[s] for s in self._batch]
        rows, cols, blocks, slots = [], [], [], []
        for b, (s, n) in enumerate(zip(self._batch, n_new, strict=True)):
            table = self._tables[s]
            if len(table) * self.block_size < lengths[b] + n:
                raise ValueError(f"sequence {s} has room for {len(table) * self.block_size} tokens, needs "
                                 f"{lengths[b] + n}: reserve first")
            if n and not self.allocator.writable(table[lengths[b] // self.block_size]):
                raise ValueError(f"sequence {s} would write into a shared block: reserve first (copy-on-write)")
            for t in range(n):
                block, slot = self._slot(s, lengths[b] + t)
                rows.append(b)
                cols.append(t)
                blocks.append(block)
                slots.append(slot)
        write = tuple(torch.tensor(x, device=device) for x in (blocks, slots, rows, cols)) if rows else None
        # the queries of a right-padded row still count T keys: its real ones sit first and, causal,
        # never see the padding; table columns past a row's blocks point at block 0 (read, never seen)
        width = max(-(-(n + T) // self.block_size) for n in lengths)
        table = torch.zeros((len(lengths), width), dtype=torch.long)
        for b, s in enumerate(self._batch):
            row = self._tables[s][:width]
            table[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        total = torch.tensor(lengths, dtype=torch.long) + T
        return write, table.to(device), total.to(device)

    def advance(self, n_tokens: int) -> None:
        """After a forward of ``n_tokens`` columns: each row's length grows by its real new tokens."""
        for s, n in zip(self._batch, self._new_counts(n_tokens), strict=True):
            self._lengths[s] += n
        self._plan = None

    # --- accounting ---

    def waste(self) -> dict:
        """Slots of the blocks the sequences hold (each physical block once), slots holding a token,
        and the waste fraction: reserved but unused / reserved (0 when nothing is reserved)."""
        filled: dict[int, int] = {}
        for s, table in self._tables.items():
            for i, block in enumerate(table):
                used = min(max(self._lengths[s] - i * self.block_size, 0), self.block_size)
                filled[block] = max(filled.get(block, 0), used)
        reserved = len(filled) * self.block_size
        used = sum(filled.values())
        return {"reserved_slots": reserved, "used_slots": used,
                "waste": (reserved - used) / reserved if reserved else 0.0}

    @property
    def nbytes(self) -> int:
        """Bytes of the two pools."""
        return self.k_pool.nbytes + self.v_pool.nbytes


@torch.no_grad()
def ragged_greedy(config: dict, state: dict[str, torch.Tensor], prompts: Sequence[torch.Tensor],
                  max_new_tokens: int, block_size: int = 4) -> torch.Tensor:
    """Greedy new tokens (B, max_new_tokens) of prompts of different lengths decoded in ONE batch
    through a ``PagedKVCache``: one right-padded prefill, then one token per row per step, every row
    at its own length (position_ids passed). Must equal each prompt decoded alone."""
    model = GPT.from_state(config, state)
    B = len(prompts)
    lens = [len(p) for p in prompts]
    per_seq = -(-(max(lens) + max_new_tokens) // block_size)
    cache = PagedKVCache.for_model(model, B * per_seq + 1, block_size)
    T = max(lens)
    idx = torch.zeros((B, T), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :lens[b]] = p
        cache.add_sequence(b)
        cache.reserve(b, lens[b])
    cache.set_batch(list(range(B)), lens)
    pos = torch.arange(T).expand(B, T).clamp(max=model.config.block_size - 1)  # padding's positions: unread
    logits = model(idx, cache=cache, position_ids=pos)
    next_id = logits[torch.arange(B), torch.tensor(lens) - 1].argmax(-1, keepdim=True)  # (B, 1)
    out = [next_id]
    for _ in range(max_new_tokens - 1):
        for b in range(B):
            cache.reserve(b, 1)
        cache.set_batch(list(range(B)))
        pos = torch.tensor([[cache.length(b)] for b in range(B)])
        next_id = model(next_id, cache=cache, position_ids=pos)[:, -1].argmax(-1, keepdim=True)
        out.append(next_id)
    return torch.cat(out, dim=1)
