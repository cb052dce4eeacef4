"""Project 1 claims: the nanoGPT CPU recipe's val loss, and how coherent its samples are."""

from __future__ import annotations

import functools
import re
from collections import Counter

import torch

from harness.measure import Context, Plot, Result
from impl.char_gpt.train import full_split_loss, prepare, sample, train_char_gpt
from impl.gpt.model import GPTConfig
from impl.train.loop import TrainConfig

WORD = re.compile(r"[A-Za-z']+")


@functools.lru_cache(maxsize=1)
def _trained():
    """nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iters, dropout 0.

    The same recipe in quick and full mode: it is what the claim is about, and takes ~1.5 min here.
    """
    data = prepare("tinyshakespeare")
    model_cfg = GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4,
                          n_embd=128, dropout=0.0)
    train_cfg = TrainConfig(max_iters=2000, lr_decay_iters=2000, batch_size=12, block_size=64,
                            eval_iters=20, eval_interval=250)
    model, result = train_char_gpt(data, model_cfg, train_cfg, progress=False)
    return data, model.eval(), result


def recipe_val_loss(ctx: Context) -> Result:
    data, model, result = _trained()
    val = full_split_loss(model, data.val)
    iters = [row["iter"] for row in result.history]
    return Result(
        value=val,
        unit="nats",
        details={
            "val_loss_whole_split": round(val, 4),
            "val_loss_recipe_estimate (20 batches)": round(result.final_val_loss, 4),
            "train_loss_recipe_estimate": round(result.history[-1]["train_loss"], 4),
            "wall_s": round(result.wall_s, 1),
            "tokens_per_s": round(result.tokens_per_s),
            "parameters": model.num_params(),
            "threads": torch.get_num_threads(),
        },
        plots=[Plot("Training curve (nanoGPT CPU recipe)", iters,
                    {"train": [r["train_loss"] for r in result.history],
                     "val": [r["val_loss"] for r in result.history]},
                    xlabel="iteration", ylabel="loss (nats)")],
    )


def word_share(text: str, vocabulary: set[str]) -> float:
    """Share of the words in ``text`` that occur in ``vocabulary`` (lower-cased)."""
    words = [w.lower() for w in WORD.findall(text)]
    return sum(w in vocabulary for w in words) / max(1, len(words))


def sample_coherence(ctx: Context) -> Result:
    data, model, _ = _trained()
    vocabulary = {w.lower() for w in WORD.findall(data.train_text)}
    text = sample(model, data.tokenizer, "\n", n_chars=2000, temperature=0.8, top_k=20, seed=0)
    # yardstick: characters drawn independently by their corpus frequency
    counts = Counter(data.train_text)
    chars, weights = zip(*counts.items(), strict=True)
    draws = torch.multinomial(torch.tensor(weights, dtype=torch.float), 2000, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    unigram = "".join(chars[i] for i in draws.tolist())
    share = word_share(text, vocabulary)
    return Result(
        value=share,
        details={"words_in_sample": len(WORD.findall(text)),
                 "char_frequency_sampler_share": round(word_share(unigram, vocabulary), 3),
                 "held_out_text_share": round(word_share(data.tokenizer.decode(data.val[:2000].tolist()),
                                                         vocabulary), 3)},
        text=text,
    )
