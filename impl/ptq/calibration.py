"""Calibration sets for post-training quantization: windows of the TRAINING split (never held-out text,
which the perplexities are measured on), drawn at seeded random offsets."""

from __future__ import annotations

import numpy as np
import torch


def calibration_batches(train_ids: np.ndarray, n_samples: int = 128, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` consecutive token ids of ``train_ids`` (1-D), at offsets drawn
    uniformly with ``seed`` (the same seed gives the same set): (n_samples, seq_len) int64."""
    ids = np.asarray(train_ids)
    if len(ids) < seq_len:
        raise ValueError(f"calibration needs windows of {seq_len} tokens; the training split has {len(ids)}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=n_samples)
    return torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]).astype(np.int64))
