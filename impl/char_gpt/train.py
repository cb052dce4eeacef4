"""Train the character-level GPT and sample from it (the pipeline behind ``python -m impl.char_gpt``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from impl.data.corpus import load_text, split_text
from impl.data.tokens import CharTokenizer
from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache.naive import generate
from impl.train.checkpoint import load_checkpoint, read_meta
from impl.train.loop import TrainConfig, TrainResult, train

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class CharData:
    tokenizer: CharTokenizer
    train: np.ndarray  # uint16 ids
    val: np.ndarray
    train_text: str


def prepare(corpus: str = "tinyshakespeare", val_fraction: float = 0.1) -> CharData:
    """Load ``corpus``, split 90/10 (nanoGPT's split), and encode both parts as uint16 ids."""
    text = load_text(corpus)
    tok = CharTokenizer.from_text(text)
    train_text, val_text = split_text(text, val_fraction)
    as_ids = lambda s: np.array(tok.encode(s), dtype=np.uint16)  # noqa: E731
    return CharData(tok, as_ids(train_text), as_ids(val_text), train_text)


def recipe(vocab_size: int, seed: int = 1337) -> tuple[GPTConfig, TrainConfig]:
    """nanoGPT's shakespeare_char CPU recipe as (model config, training config).

    The README's command line (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations
    with the cosine decay ending at 2000, dropout 0, 20 evaluation batches) on top of its
    ``train.py`` defaults: no biases, AdamW betas (0.9, 0.99), weight decay 0.1 on 2-D weights,
    clipping at 1.0, 100 warm-up iterations, learning rate 1e-3 decaying to 1e-4, seed 1337.
    """
    model_cfg = GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0, bias=False)
    train_cfg = TrainConfig(max_iters=2000, lr_decay_iters=2000, batch_size=12, block_size=64,
                            learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, weight_decay=0.1,
                            beta1=0.9, beta2=0.99, grad_clip=1.0, eval_interval=250, eval_iters=20,
                            seed=seed)
    return model_cfg, train_cfg


def train_char_gpt(
    data: CharData, model_cfg: GPTConfig, train_cfg: TrainConfig, out_dir: str | Path | None = None,
    resume: bool = False, progress: bool = True, device: str = "cpu",
) -> tuple[GPT, TrainResult]:
    """Train a fresh GPT (seeded by ``train_cfg.seed``) on ``data`` on ``device``; checkpoints go
    to ``out_dir``. Returns the trained model (on ``device``) and the loop's result."""
    torch.manual_seed(train_cfg.seed)
    # built on the CPU, then moved: the same seed gives the same initial weights on every device
    model = GPT(model_cfg).to(device)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(Path(out_dir) / TOKENIZER_FILE)
    result = train(model, data.train, data.val, train_cfg, out_dir, resume, progress=progress,
                   extra_meta={"model_config": model_cfg.to_dict()})
    return model, result


def load_trained(out_dir: str | Path, which: str = "best") -> tuple[GPT, CharTokenizer]:
    """The model and tokenizer saved by ``train_char_gpt`` in ``out_dir``."""
    out = Path(out_dir)
    meta = read_meta(out / f"{which}.safetensors")
    model = GPT(GPTConfig(**meta["model_config"]))
    load_checkpoint(out / f"{which}.safetensors", model)
    return model.eval(), CharTokenizer.load(out / TOKENIZER_FILE)


def sample(
    model: GPT, tok: CharTokenizer, prompt: str = "\n", n_chars: int = 500,
    temperature: float = 0.8, top_k: int | None = 20, seed: int = 0,
) -> str:
    """``n_chars`` of text continuing ``prompt`` (the prompt itself not included), sampled on the
    model's device (a seed gives the same text on the same device)."""
    device = next(model.parameters()).device
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, n_chars, temperature, top_k, gen, crop_context=True)
    return tok.decode(out[0, idx.shape[1] :].tolist())
