"""Pre-train a GPT on prepared token files, load it back, sample from it (behind the CLI).

Precision: ``TrainConfig.dtype`` picks autocast (fp32 off, bf16, fp16); fp16 gets a
``torch.amp.GradScaler`` here (dynamic loss scaling: fp16 gradients underflow without it).
Memory: ``GPTConfig.gradient_checkpointing`` recomputes each block in the backward.
"""

from __future__ import annotations

from pathlib import Path

import torch

from impl.gpt.model import GPT, GPTConfig
from impl.kv_cache.fast import generate
from impl.pretrain.data import TokenFiles, Tokenizer
from impl.train.checkpoint import load_checkpoint, read_meta
from impl.train.loop import LossScaler, TrainConfig, TrainResult, train


def make_scaler(dtype: str, device: str) -> LossScaler | None:
    """A dynamic loss scaler for fp16 autocast, None otherwise (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device) if dtype == "fp16" else None


def pretrain(
    tokens: TokenFiles, model_cfg: GPTConfig, train_cfg: TrainConfig, out_dir: str | Path | None = None,
    resume: bool = False, device: str = "cpu", progress: bool = True, scaler: LossScaler | None = None,
) -> tuple[GPT, TrainResult]:
    """Train a fresh GPT (seeded by ``train_cfg.seed``) on ``tokens``' memmaps; checkpoints,
    ``metrics.jsonl`` (and TensorBoard events if asked) go to ``out_dir``. fp16 uses ``scaler``
    (any ``LossScaler``, e.g. project 7's), by default a ``GradScaler``."""
    if model_cfg.vocab_size < tokens.vocab_size:
        raise ValueError(f"model vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tokens.vocab_size}: set the model's vocab_size from the token files")
    if train_cfg.block_size > model_cfg.block_size:
        raise ValueError(f"training windows of {train_cfg.block_size} tokens exceed the model's "
                         f"block_size {model_cfg.block_size}")
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg).to(device)
    tokens_meta = {**tokens.meta, "directory": str(tokens.directory)}
    meta = {"model_config": model_cfg.to_dict(), "tokens": tokens_meta}
    if scaler is None:
        scaler = make_scaler(train_cfg.dtype, device)
    result = train(model, tokens.train, tokens.val, train_cfg, out_dir, resume, scaler=scaler,
                   progress=progress, extra_meta=meta)
    return model, result


def load_pretrained(out_dir: str | Path, which: str = "best", device: str = "cpu") -> tuple[GPT, dict]:
    """The model saved by ``pretrain`` in ``out_dir`` (``best`` or ``last``), in eval mode, and the
    checkpoint's metadata (model config, token files and tokenizer it was trained with)."""
    path = Path(out_dir) / f"{which}.safetensors"
    meta = read_meta(path)
    model = GPT(GPTConfig(**{**meta["model_config"], "gradient_checkpointing": False}))
    load_checkpoint(path, model)
    return model.to(device).eval(), meta


def sample_text(
    model: GPT, tokenizer: Tokenizer, prompt: str, n_tokens: int = 200,
    temperature: float = 0.8, top_k: int | None = 50, seed: int = 0,
) -> str:
    """``n_tokens`` tokens continuing ``prompt`` (the prompt not included), decoded to text."""
    device = next(model.parameters()).device
    block = model.config.block_size
    if not 0 < n_tokens < block:
        raise ValueError(f"n_tokens must be between 1 and {block - 1} (the model's block_size is {block})")
    context = (tokenizer.encode(prompt) or tokenizer.encode("\n"))[-(block - n_tokens):]  # the prompt's end
    idx = torch.tensor([context], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, n_tokens, temperature, top_k, gen)
    return tokenizer.decode(out[0, idx.shape[1]:].tolist())
