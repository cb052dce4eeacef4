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


def train_char_gpt(
    data: CharData, model_cfg: GPTConfig, train_cfg: TrainConfig, out_dir: str | Path | None = None,
    resume: bool = False, progress: bool = True,
) -> tuple[GPT, TrainResult]:
    """Train a fresh GPT (seeded by ``train_cfg.seed``) on ``data``; checkpoints go to ``out_dir``."""
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        data.tokenizer.save(Path(out_dir) / TOKENIZER_FILE)
    result = train(model, data.train, data.val, train_cfg, out_dir, resume, progress=progress,
                   extra_meta={"model_config": model_cfg.to_dict()})
    return model, result


@torch.no_grad()
def full_split_loss(model: GPT, ids: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss over every non-overlapping window of the split (no sampling noise)."""
    block = model.config.block_size
    n = (len(ids) - 1) // block
    x = torch.from_numpy(ids[: n * block].astype(np.int64)).view(n, block)
    y = torch.from_numpy(ids[1 : n * block + 1].astype(np.int64)).view(n, block)
    model.eval()
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i : i + batch_size])
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y[i : i + batch_size].reshape(-1), reduction="sum"
        ).item()
    return total / (n * block)


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
    """``n_chars`` of text continuing ``prompt`` (the prompt itself not included)."""
    idx = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out = generate(model, idx, n_chars, temperature, top_k, gen, crop_context=True)
    return tok.decode(out[0, idx.shape[1] :].tolist())
