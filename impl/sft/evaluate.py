"""Evaluating an instruction-following model: greedy answers to held-out prompts, exact match per task.

A prompt is the chat without its answer plus the generation prompt (``<|assistant|>\\n``); the model
answers through the KV-cache decoder (``impl.kv_cache.fast.decode``, prompts of different lengths in
one left-padded batch) until it writes ``<|end|>`` (or end of text). The answer is the text before that
stop token, compared with ``impl.sft.tasks.exact_match``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from impl.bpe.tokenizer import ENDOFTEXT
from impl.kv_cache.fast import decode, pad_prompts
from impl.sft.fast import pad_id, record_messages
from impl.sft.tasks import exact_match
from impl.sft.templates import END, tokenize_chat


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` (no assistant answer at the end) followed by the generation prompt."""
    return tokenize_chat(tokenizer, messages, add_generation_prompt=True)[0]


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids that end an answer: ``<|end|>`` and ``<|endoftext|>`` where the tokenizer has them."""
    return [tokenizer.special_tokens[t] for t in (END, ENDOFTEXT) if t in tokenizer.special_tokens]


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]],
           max_new_tokens: int = 48, batch_size: int = 64, temperature: float = 0.0,
           generator: torch.Generator | None = None, progress: bool = False) -> list[str]:
    """The model's answer to each chat (its last turn a user turn): greedy by default, batched."""
    model.eval()
    stops, pad = stop_ids(tokenizer), pad_id(tokenizer)
    out: list[str] = []
    starts = range(0, len(chats), batch_size)
    for start in tqdm(starts, desc="answer", disable=not progress, leave=False):
        prompts = [prompt_ids(tokenizer, c) for c in chats[start:start + batch_size]]
        limit = min(max_new_tokens, model.config.block_size - max(map(len, prompts)))
        if limit < 1:
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no room in block_size "
                             f"{model.config.block_size}")
        idx, mask = pad_prompts(prompts, pad)
        gen = decode(model, idx, limit, attention_mask=mask, temperature=temperature, generator=generator,
                     stop_ids=stops, pad_id=pad)
        for row in gen.new_tokens.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode(row[:cut]))
    return out


def accuracy(model: torch.nn.Module, tokenizer: Any, records: Sequence[dict[str, Any]], max_new_tokens: int = 48,
             batch_size: int = 64, progress: bool = False) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on ``records`` (task records or chats whose last turn is the
    reference answer): ``{"exact_match", "n", "per_task": {kind: accuracy}, "predictions"}``."""
    chats, answers = [], []
    for r in records:
        messages = record_messages(r)
        if messages[-1]["role"] != "assistant":
            raise ValueError("an evaluation record must end with the reference answer (an assistant turn)")
        chats.append(messages[:-1])
        answers.append(messages[-1]["content"])
    predictions = answer(model, tokenizer, chats, max_new_tokens, batch_size, progress=progress)
    hits = [exact_match(p, a) for p, a in zip(predictions, answers, strict=True)]
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r, hit in zip(records, hits, strict=True):
        by_task[r.get("task", "chat")].append(hit)
    return {
        "exact_match": sum(hits) / len(hits) if hits else float("nan"),
        "n": len(hits),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(by_task.items())},
        "predictions": predictions,
    }
