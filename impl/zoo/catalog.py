"""The named recipes: ``char``, ``bpe-small``, ``bpe-base`` (data only; ``recipes.py`` trains them).

Why these shapes (measured on the shared 2-core machine; impl/zoo/README.md has the figures):
- ``char``: project 1's recipe (nanoGPT's shakespeare_char CPU recipe) on tiny-Shakespeare.
- ``bpe-small``: 2,048-id BPE, 4 layers x 128, block 128, 600 iterations: the quick bench's model.
- ``bpe-draft``: bpe-base's tokenizer settings and corpus (so the very same 4,096 merges), 2 layers x 128:
  the draft model of speculative decoding (P11), ~10x bpe-base's cached tokens/s on this CPU.
- ``bpe-base``: 4,096-id BPE, 6 layers x 256, block 256, bf16 autocast, 1,600 iterations: ~15
  minutes on 2 idle cores. 4,096 ids: 3.42 bytes per token on the held-out text against 3.00 for
  2,048 and 3.76 for 8,192, whose embedding and softmax cost twice as much for 10% fewer tokens;
  6 x 256 rather than 6 x 384: ~40% more tokens per second, and at ~6M tokens of compute the
  smaller model is nearer the compute-optimal size.
"""

from __future__ import annotations

from impl.gpt.model import GPTConfig
from impl.sft.templates import SPECIAL_TOKENS
from impl.train.loop import TrainConfig
from impl.zoo.recipes import Recipe

# SPECIAL_TOKENS (the chat template's, impl/sft/templates.py) are reserved from the start so
# fine-tuning never has to grow the vocabulary: end of text (document separator), the three role
# markers, an end-of-turn marker (a turn ends without the document ending, so a multi-turn chat
# stays one document and generation can stop at the end of the assistant's turn), and padding
# (batches of unequal lengths; masked out of the loss).


def _char_recipe() -> Recipe:
    from impl.char_gpt.train import recipe

    model_cfg, train_cfg = recipe(vocab_size=65)  # tinyshakespeare's 65 characters (checked at build time)
    return Recipe("char", "P1 character GPT: nanoGPT's shakespeare_char CPU recipe on tiny-Shakespeare",
                  "tinyshakespeare", {"kind": "char"}, model_cfg, train_cfg)


def _bpe_small_recipe() -> Recipe:
    vocab = 2048
    model = GPTConfig(vocab_size=vocab, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
    cfg = TrainConfig(max_iters=600, lr_decay_iters=600, batch_size=16, block_size=128, learning_rate=3e-3,
                      min_lr=3e-4, warmup_iters=30, beta2=0.95, eval_interval=100, eval_iters=10, dtype="bf16")
    return Recipe("bpe-small", "2,048-id BPE GPT, 4 x 128, block 128: ~1 min on 2 idle cores (CI's quick bench)",
                  "shakespeare", {"kind": "bpe", "vocab_size": vocab, "pattern": "gpt4",
                                  "special_tokens": list(SPECIAL_TOKENS)}, model, cfg)


def _bpe_base_recipe() -> Recipe:
    vocab = 4096
    model = GPTConfig(vocab_size=vocab, block_size=256, n_layer=6, n_head=4, n_embd=256, dropout=0.0, bias=False)
    cfg = TrainConfig(max_iters=1600, lr_decay_iters=1600, batch_size=16, block_size=256, learning_rate=2e-3,
                      min_lr=2e-4, warmup_iters=50, beta2=0.95, eval_interval=200, eval_iters=10, dtype="bf16")
    return Recipe("bpe-base", "4,096-id BPE GPT, 6 x 256, block 256, bf16: the base model later projects start "
                  "from (15 min on 2 idle cores)", "shakespeare",
                  {"kind": "bpe", "vocab_size": vocab, "pattern": "gpt4", "special_tokens": list(SPECIAL_TOKENS)},
                  model, cfg, wikitext_eval=True)


def _bpe_draft_recipe() -> Recipe:
    base = _bpe_base_recipe()  # the same corpus and tokenizer settings: the same learnt merges, the same ids
    model = GPTConfig(vocab_size=base.model.vocab_size, block_size=base.model.block_size, n_layer=2, n_head=4,
                      n_embd=128, dropout=0.0, bias=False)
    cfg = TrainConfig(max_iters=1200, lr_decay_iters=1200, batch_size=16, block_size=256, learning_rate=3e-3,
                      min_lr=3e-4, warmup_iters=50, beta2=0.95, eval_interval=200, eval_iters=10, dtype="bf16")
    return Recipe("bpe-draft", "bpe-base's tokenizer, 2 x 128: the draft model of speculative decoding (P11)",
                  base.corpus, dict(base.tokenizer), model, cfg)


RECIPES: dict[str, Recipe] = {r.name: r for r in (_char_recipe(), _bpe_small_recipe(), _bpe_base_recipe(),
                                                   _bpe_draft_recipe())}
