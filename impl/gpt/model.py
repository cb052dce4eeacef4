"""The one GPT model every project shares: a GPT-2-style decoder in one file.

Seams later projects plug into without forking this file:
- attention backend: ``GPTConfig.attention`` names a function registered in ``attention.py``
  (naive, sdpa; flash, sparse, split-K add themselves);
- feed-forward layer: ``GPTConfig.ffn`` names a factory registered with ``register_ffn`` (the
  GPT-2 ``MLP`` is ``"mlp"``; an MoE layer adds itself, P21). An FFN with an auxiliary loss
  (load balancing) sets ``self.aux_loss`` on every forward; ``GPT.aux_loss()`` sums them and the
  training step adds it to the language-model loss;
- KV cache: ``forward(idx, cache=...)`` takes any object with ``position`` (tokens cached),
  ``attend(layer, q, k, v, attend_fn, key_valid) -> y`` and ``advance(n_tokens)``. The cache
  attends over its own storage, so a paged (P13) or int8 (P15) cache never has to build a
  contiguous copy; a contiguous cache stores k/v and calls ``attend_fn`` on them (P8, P10);
- ragged batches: ``attention_mask`` (B, S) marks real tokens (1) and padding (0), HF's
  convention, S counting cached tokens too; positions then count real tokens per row, so a
  left-padded prompt starts at position 0 and every row of a cache sits at its own position;
- packed rows: ``segment_ids`` (B, T) numbers the examples concatenated in each row (0 =
  padding); attention stays inside each example and positions restart at 0 for each (P4);
- hidden states: ``embed`` -> ``model.blocks[i](x, ...)`` -> ``head`` is the whole forward, so a
  caller may run the blocks one at a time (pipeline stages P24, early exit P27);
  ``hidden_states`` returns every layer's output (distillation P18);
- shapes: each attention layer reads its head count from its own projection (pruned heads P17,
  tensor-parallel shards P23); ``tie_embeddings`` may be switched off (P19);
  ``resize_token_embeddings`` adds rows for new special tokens; ``from_state`` loads strictly;
- linear layers: plain ``nn.Linear`` modules named like GPT-2's (``c_attn``, ``c_proj``,
  ``c_fc``) so LoRA, quantized and sharded layers replace them by name (P5, P14, P16, P23);
- precision: works under ``torch.autocast`` (bf16, fp16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from impl.gpt.attention import AttentionFn, get_attention, supports_segments


@dataclass
class GPTConfig:
    """Plain data: the shape of the model and which attention backend and FFN it runs."""

    vocab_size: int = 65
    block_size: int = 64  # longest context the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"
    gradient_checkpointing: bool = False
    tie_embeddings: bool = True  # the output head shares the token embedding (GPT-2, Press & Wolf 2017)
    ffn: str = "mlp"  # a feed-forward factory registered with register_ffn

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVCacheLike(Protocol):
    """What ``GPT.forward`` needs from a KV cache."""

    position: int  # tokens cached so far (slots: the same for every row)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_fn: AttentionFn, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Store the new (B, nh, T, hs) keys/values of ``layer`` and return the attention output
        (B, nh, T, hs) of ``q`` over everything cached (``attend_fn``'s contract)."""
        ...

    def advance(self, n_tokens: int) -> None: ...


def call_attention(attend_fn: AttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_valid: torch.Tensor | None) -> torch.Tensor:
    """Causal attention through a backend; ``key_valid`` is passed only for ragged batches, so a
    backend written before padding existed still runs every unpadded batch."""
    return attend_fn(q, k, v, True) if key_valid is None else attend_fn(q, k, v, True, key_valid)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.layer = layer
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.attend = get_attention(config.attention)

    @property
    def n_head(self) -> int:
        """Heads this layer has: read from its projection, so pruning or sharding heads needs no
        config change."""
        return self.c_attn.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor, cache: KVCacheLike | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=2)  # each (B, T, nh * hs)
        # (B, T, nh * hs) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = call_attention(self.attend, q, k, v, key_valid)
        else:
            y = cache.attend(self.layer, q, k, v, self.attend, key_valid)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


FFNFactory = Callable[[GPTConfig], nn.Module]
_FFNS: dict[str, FFNFactory] = {}


def register_ffn(name: str, factory: FFNFactory) -> None:
    """Make ``factory(config) -> nn.Module`` (x (B, T, C) -> (B, T, C)) selectable as
    ``GPTConfig(ffn=name)``."""
    _FFNS[name] = factory


def get_ffn(name: str) -> FFNFactory:
    """The FFN factory registered under ``name``; a clear error lists the known ones."""
    if name not in _FFNS:
        raise ValueError(f"unknown ffn {name!r}; known: {', '.join(sorted(_FFNS))}")
    return _FFNS[name]


register_ffn("mlp", MLP)


class Block(nn.Module):
    """Pre-norm transformer decoder block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = get_ffn(config.ffn)(config)  # named mlp whatever it is: GPT-2's weight names

    def forward(self, x: torch.Tensor, cache: KVCacheLike | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, key_valid)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor],
                   allow_missing: Iterable[str] = (), **overrides: Any) -> GPT:
        """A model of shape ``config`` (with ``overrides``, e.g. ``attention="naive"``) holding
        weights ``state``, in the weights' dtype, in eval mode.

        Loading is strict: a key of ``state`` the model does not have, or a weight of the model
        that ``state`` lacks, is an error (a LoRA or quantized weight is never silently dropped),
        except the names in ``allow_missing`` and a tied weight whose twin is present."""
        model = cls(GPTConfig(**{**config, **overrides}))
        load_strict(model, state, allow_missing)
        return model.to(dtype=next(iter(state.values())).dtype).eval()

    def set_attention(self, name: str) -> None:
        """Switch every layer to another registered attention backend (weights untouched)."""
        fn = get_attention(name)
        self.config.attention = name
        for block in self.blocks:
            block.attn.attend = fn

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); without position embeddings if ``non_embedding``."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    @torch.no_grad()
    def resize_token_embeddings(self, vocab_size: int, generator: torch.Generator | None = None) -> None:
        """Grow (or shrink) the vocabulary to ``vocab_size`` rows, e.g. for new special tokens.

        Kept rows are unchanged; new rows start at the mean of the old embedding plus noise of a
        tenth of its spread, so a new token's initial logit is like an average token's rather than
        a random direction's. The head follows the embedding (tied) or gets new rows the same way.
        """
        old = self.wte.weight
        n_keep = min(vocab_size, old.shape[0])

        def resized(weight: torch.Tensor) -> nn.Parameter:
            new = torch.empty(vocab_size, weight.shape[1], dtype=weight.dtype, device=weight.device)
            new[:n_keep] = weight[:n_keep]
            if vocab_size > n_keep:
                noise = torch.randn(vocab_size - n_keep, weight.shape[1], generator=generator,
                                    dtype=torch.float32).to(weight.device)
                spread = weight.float().std(dim=0)
                new[n_keep:] = (weight.float().mean(dim=0) + 0.1 * spread * noise).to(weight.dtype)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.wte.weight = resized(old)
        self.wte.num_embeddings = vocab_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            self.lm_head.weight = resized(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the FFN layers set on their last forward (None if none do)."""
        losses = [b.mlp.aux_loss for b in self.blocks if getattr(b.mlp, "aux_loss", None) is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def positions(self, idx: torch.Tensor, start: int = 0,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Position ids (B, T) or (T,) of ``idx`` after ``start`` cached tokens: consecutive slots,
        or with ``attention_mask`` (B, start + T) the number of real tokens before each one
        (padding gets position 0: its output is never read). HF's rule for padded batches."""
        B, T = idx.shape
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if attention_mask is None:
            return torch.arange(start, start + T, device=idx.device)
        if attention_mask.shape != (B, start + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new) "
                             f"= ({B}, {start + T})")
        return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:]

    @staticmethod
    def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
        """Position ids (B, T) of packed rows: each contiguous run of one segment id counts from 0."""
        t = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        run_start = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
        return t - run_start

    def embed(self, idx: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings (B, T, C): the input of the first block."""
        return self.drop(self.wte(idx) + self.wpe(position_ids))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) from the last block's output."""
        return self.lm_head(self.ln_f(x))

    def _packed(self, idx: torch.Tensor, cache: KVCacheLike | None, attention_mask: torch.Tensor | None,
                segment_ids: torch.Tensor) -> torch.Tensor:
        """Check a packed batch's ``segment_ids``; return them as the attention's key mask (long)."""
        if cache is not None or attention_mask is not None:
            raise ValueError("segment_ids (packed training rows) cannot be combined with a cache or an attention_mask")
        if segment_ids.shape != idx.shape:
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected {tuple(idx.shape)} like idx")
        if segment_ids.dtype == torch.bool or segment_ids.is_floating_point():
            raise ValueError(f"segment_ids must be integer segment numbers (0 = padding), got {segment_ids.dtype}")
        unaware = [b.attn.attend for b in self.blocks if not supports_segments(b.attn.attend)]
        if unaware:
            raise ValueError(f"attention backend {self.config.attention!r} cannot keep packed examples apart; "
                             "run packed batches with attention='sdpa' or 'naive'")
        return segment_ids.long()

    def _run(self, idx: torch.Tensor, cache: KVCacheLike | None, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None, keep: list[torch.Tensor] | None,
             segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embed, run every block (appending each output to ``keep``), advance the cache."""
        start = cache.position if cache is not None else 0
        if segment_ids is not None:
            key_valid: torch.Tensor | None = self._packed(idx, cache, attention_mask, segment_ids)
            if position_ids is None:
                position_ids = self.segment_positions(segment_ids)
        else:
            key_valid = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            position_ids = self.positions(idx, start, attention_mask)
        x = self.embed(idx, position_ids)  # (B, T, C)
        if keep is not None:
            keep.append(x)
        for block in self.blocks:
            if self.config.gradient_checkpointing and self.training and cache is None:
                # keep only block inputs; recompute activations in backward
                x = checkpoint(block, x, None, key_valid, use_reentrant=False)
            else:
                x = block(x, cache, key_valid)
            if keep is not None:
                keep.append(x)
        if cache is not None:
            cache.advance(idx.shape[1])
        return x

    def forward(self, idx: torch.Tensor, cache: KVCacheLike | None = None, *,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T), continuing ``cache`` if given.

        ``attention_mask`` (B, cached + T): 1 for real tokens, 0 for padding (ragged batches);
        ``position_ids`` (B, T) overrides the positions derived from it; ``segment_ids`` (B, T):
        packed rows, each example a contiguous run numbered 1, 2, ... (0 = padding), attending only
        within itself and positioned from 0 (no cache, no attention_mask)."""
        return self.head(self._run(idx, cache, attention_mask, position_ids, None, segment_ids))

    def hidden_states(self, idx: torch.Tensor, cache: KVCacheLike | None = None, *,
                      attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer's hidden state, n_layer + 1 tensors (B, T, C): the embeddings, then each
        block's output (before the final LayerNorm). ``head(states[-1])`` are the logits."""
        states: list[torch.Tensor] = []
        self._run(idx, cache, attention_mask, position_ids, states, segment_ids)
        return states


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], allow_missing: Iterable[str] = ()) -> None:
    """``model.load_state_dict(state)`` that fails on any unexpected key and on any missing one,
    except names in ``allow_missing`` and a weight tied to one that ``state`` holds (the
    ``lm_head.weight`` of a tied GPT); the error names every offending key."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    twins: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        twins.setdefault(id(p), set()).add(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    allowed = set(allow_missing)
    missing = [n for n in missing
               if n not in allowed and not (n in params and twins[id(params[n])] & set(state))]
    if missing or unexpected:
        raise ValueError(f"state does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index
    )
