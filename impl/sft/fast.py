"""Supervised fine-tuning, the fast way: batched, padded or packed, prompt tokens masked.

An example is a conversation (or an Alpaca record) tokenized by ``impl.sft.templates``: token ids and,
at each position, the label the loss trains (``IGNORE_INDEX`` on prompt tokens). ``shift`` turns it into
``Example(inputs, targets)``: the model reads ``inputs`` and position i is scored on ``targets[i]``, the
label of token i + 1. Shifting each example on its own, before any batching, means no example is ever
scored on the first token of the next one.

Two ways to batch:
- ``pad_batch``: one example per row, right-padded, an ``attention_mask`` for the model;
- ``pack_rows``: examples laid end to end in rows of ``max_len`` tokens, ``segment_ids`` numbering
  them, so the model's attention stays inside each example and positions restart at 0 (the ragged
  seam of ``impl.gpt.model``): no padding wasted, no example attending to another.

Either batch goes through the shared ``impl.train.loop.train_step`` (targets of -100 leave the loss);
the loss is the mean over the trained tokens of the batch, the same number ``impl.sft.naive`` gets by
looping over the examples one at a time.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from impl.gpt.model import GPT, lm_loss
from impl.sft.tasks import as_messages
from impl.sft.templates import IGNORE_INDEX, PAD, render_alpaca, tokenize_chat
from impl.train.loop import TrainConfig, lr_at, make_optimizer, train_step


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``targets[i]`` is what the model should predict after ``inputs[: i + 1]``
    (``IGNORE_INDEX`` where nothing is trained)."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def n_trained(self) -> int:
        """How many targets the loss counts."""
        return sum(t != IGNORE_INDEX for t in self.targets)


def shift(ids: Sequence[int], labels: Sequence[int]) -> Example:
    """The example for token ids ``ids`` whose own-position labels are ``labels`` (as
    ``tokenize_chat`` makes them): inputs drop the last token, targets drop the first label."""
    if len(ids) != len(labels):
        raise ValueError(f"ids and labels differ in length: {len(ids)} != {len(labels)}")
    if len(ids) < 2:
        raise ValueError(f"an example needs at least 2 tokens, got {len(ids)}")
    return Example(tuple(ids[:-1]), tuple(labels[1:]))


def record_messages(record: dict[str, Any], system: str | None = None) -> list[dict[str, str]]:
    """The chat of a record: ``{"messages": [...]}`` as it is, an ``{"instruction", "input", "output"}``
    record as a user turn and the assistant's answer (``impl.sft.tasks.as_messages``)."""
    if "messages" in record:
        return list(record["messages"])
    return as_messages({"input": "", **record}, system)


def encode_record(tokenizer: Any, record: dict[str, Any], template: str = "chat") -> Example:
    """Tokenize one record into an ``Example``. ``template="chat"``: the chat template on the reserved
    special tokens, only the assistant turns (and their ``<|end|>``) trained; ``"alpaca"``: the Alpaca
    prompt (untrained) then the output and the end-of-text token (trained)."""
    if template == "chat":
        return shift(*tokenize_chat(tokenizer, record_messages(record)))
    if template == "alpaca":
        if "messages" in record:
            raise ValueError("the alpaca template takes {instruction, input, output} records, not chats")
        prompt, completion = render_alpaca(record["instruction"], record.get("input", ""), record["output"])
        p = tokenizer.encode(prompt, allowed_special="none_raise")
        c = tokenizer.encode(completion, allowed_special="none_raise") + [tokenizer.eot_id]
        return shift(p + c, [IGNORE_INDEX] * len(p) + c)
    raise ValueError(f"unknown template {template!r}; known: chat, alpaca")


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: ``<|pad|>`` when the tokenizer reserves it, else 0 (never trained, never seen)."""
    return tokenizer.special_tokens.get(PAD, 0) if hasattr(tokenizer, "special_tokens") else 0


def pad_batch(examples: Sequence[Example], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(idx, targets, {"attention_mask"})``, one example per row, right-padded to the longest."""
    if not examples:
        raise ValueError("an empty batch")
    T = max(map(len, examples))
    idx = torch.full((len(examples), T), pad, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        idx[row, :n] = torch.tensor(ex.inputs)
        targets[row, :n] = torch.tensor(ex.targets)
        mask[row, :n] = 1
    return idx, targets, {"attention_mask": mask}


def pack_groups(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Indices of examples per row: each example goes, in order, into the first row with room for it
    (first fit); an example longer than ``max_len`` is an error, not truncated silently."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than the packed row length {max_len}")
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def pack_rows(examples: Sequence[Example], max_len: int, pad: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(idx, targets, {"segment_ids"})``: the examples packed end to end into rows of ``max_len``
    tokens (``pack_groups``), segment ids 1, 2, ... per example within a row, 0 on the padding after."""
    groups = pack_groups([len(e) for e in examples], max_len)
    idx = torch.full((len(groups), max_len), pad, dtype=torch.long)
    targets = torch.full((len(groups), max_len), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((len(groups), max_len), dtype=torch.long)
    for row, members in enumerate(groups):
        at = 0
        for seg, i in enumerate(members, start=1):
            ex = examples[i]
            idx[row, at:at + len(ex)] = torch.tensor(ex.inputs)
            targets[row, at:at + len(ex)] = torch.tensor(ex.targets)
            segments[row, at:at + len(ex)] = seg
            at += len(ex)
    return idx, targets, {"segment_ids": segments}


def batch_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> torch.Tensor:
    """Mean cross-entropy over the trained targets of a padded or packed batch."""
    idx, targets, kwargs = batch
    return lm_loss(model(idx, **kwargs), targets)


def sft_loss(model: torch.nn.Module, examples: Sequence[Example], pack: int | None = None) -> torch.Tensor:
    """The loss of ``examples`` as one batch: padded, or packed into rows of ``pack`` tokens."""
    return batch_loss(model, pack_rows(examples, pack) if pack else pad_batch(examples))


@dataclass
class SFTConfig:
    """Fine-tuning hyper-parameters (the defaults fine-tune ``bpe-base`` on the task set in minutes)."""

    epochs: float = 3.0
    batch_size: int = 32            # examples per optimizer step
    pack: int | None = 256          # packed row length (tokens); None: one padded example per row
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "bf16"
    seed: int = 0
    template: str = "chat"


@dataclass
class SFTResult:
    """What a fine-tuning run did: steps, wall time, tokens/s (every token read, trained or not) and
    the loss curve ``[(step, loss)]``."""

    steps: int = 0
    wall_s: float = 0.0
    tokens: int = 0
    trained_tokens: int = 0
    tokens_per_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def batches_of(examples: Sequence[Example], cfg: SFTConfig, pad: int
               ) -> Callable[[random.Random], list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]]:
    """A function drawing one optimizer step's micro-batch list: ``batch_size`` examples shuffled by
    epoch (every example once per epoch), padded or packed."""
    order: list[int] = []

    def draw(rng: random.Random) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        chosen = []
        while len(chosen) < cfg.batch_size:
            if not order:
                order.extend(rng.sample(range(len(examples)), len(examples)))
            chosen.append(examples[order.pop()])
        return [pack_rows(chosen, cfg.pack, pad) if cfg.pack else pad_batch(chosen, pad)]

    return draw


def finetune(model: torch.nn.Module, examples: Sequence[Example], cfg: SFTConfig | None = None, pad: int = 0,
             progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> SFTResult:
    """Fine-tune ``model`` in place on ``examples`` (only parameters with ``requires_grad``: full
    fine-tuning, or LoRA adapters after ``impl.lora.fast.apply_lora``) with AdamW, warmup then cosine
    decay, through the shared ``train_step``."""
    cfg = cfg or SFTConfig()
    if not examples:
        raise ValueError("no examples to fine-tune on")
    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None:
        longest = max(range(len(examples)), key=lambda i: len(examples[i]))
        if len(examples[longest]) > block:
            raise ValueError(f"example {longest} has {len(examples[longest])} tokens, more than the model's "
                             f"block_size {block}: shorten it or drop it")
        if cfg.pack and cfg.pack > block:  # a packed row is one sequence to the model: it must fit its context
            cfg = replace(cfg, pack=block)
    steps = max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    tcfg = TrainConfig(max_iters=steps, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
                       warmup_iters=min(cfg.warmup_iters, steps // 5), lr_decay_iters=steps,
                       weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, dtype=cfg.dtype, seed=cfg.seed)
    optimizer = make_optimizer(model, tcfg)
    torch.manual_seed(cfg.seed)  # dropout, LoRA dropout
    rng = random.Random(cfg.seed)
    draw = batches_of(examples, cfg, pad)
    result = SFTResult(config=asdict(cfg))
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="sft", disable=not progress, leave=False)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, tcfg)
        micro = draw(rng)
        loss = train_step(model, optimizer, micro, cfg.dtype, None, cfg.grad_clip).item()
        result.tokens += sum(int(b[0].numel()) for b in micro)
        result.trained_tokens += sum(int((b[1] != IGNORE_INDEX).sum()) for b in micro)
        result.losses.append((it, loss))
        bar.set_postfix(loss=f"{loss:.3f}")
        if on_step is not None:
            on_step(it, loss)
    model.eval()
    result.steps = steps
    result.wall_s = time.perf_counter() - t0
    result.tokens_per_s = result.tokens / result.wall_s if result.wall_s > 0 else 0.0
    return result


# ---------------------------------------------------------------- case-shaped entry points (specs/04_sft.toml)


def loss_and_grad(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
                  loss_fn: Callable[[torch.nn.Module, Sequence[Example]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``loss_fn(model, examples)`` on the GPT ``(config, state)`` and its gradient on the token embedding."""

    model = GPT.from_state(config, state)
    loss = loss_fn(model, examples)
    loss.backward()
    return {"loss": loss.detach(), "grad_wte": model.wte.weight.grad}


def padded_loss(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
                pack: int | None = None) -> dict[str, torch.Tensor]:
    """Loss and token-embedding gradient of ``examples`` as one right-padded batch (``pack`` unused)."""
    return loss_and_grad(config, state, examples, lambda m, e: sft_loss(m, e))


def packed_loss(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
                pack: int) -> dict[str, torch.Tensor]:
    """Loss and token-embedding gradient of ``examples`` packed into rows of ``pack`` tokens."""
    return loss_and_grad(config, state, examples, lambda m, e: sft_loss(m, e, pack))
