"""Mutants of project 3: each must be rejected by a check of specs/03_pretraining.toml."""

from __future__ import annotations

from unittest.mock import patch

import torch
from torch.utils.checkpoint import checkpoint

import impl.train.loop
from impl.pretrain import fast, resume
from impl.pretrain.config import param_count

_load_checkpoint = impl.train.loop.load_checkpoint


# --- gradient checkpointing ------------------------------------------------------------------

def _detached_checkpoint(block, x, *args, **kwargs):
    return checkpoint(block, x.detach(), *args, **kwargs)  # cuts the graph: earlier blocks get no gradient


def _no_grad_checkpoint(block, x, *args, **kwargs):
    with torch.no_grad():  # "save memory" by not recording the block at all
        return block(x, *args)


def checkpoint_detaches_block_input(config, state, idx, targets):
    with patch("impl.gpt.model.checkpoint", _detached_checkpoint):
        return fast.gradients(config, state, idx, targets)


def checkpoint_without_grad(config, state, idx, targets):
    with patch("impl.gpt.model.checkpoint", _no_grad_checkpoint):
        return fast.gradients(config, state, idx, targets)


# --- resume -------------------------------------------------------------------------------------

def _reseeding_load(path, model=None, optimizer=None):
    meta, rng = _load_checkpoint(path, model, optimizer)
    seed = meta["train_config"]["seed"]
    return meta, {**rng, "batches": torch.Generator().manual_seed(seed).get_state()}


def _load_without_optimizer(path, model=None, optimizer=None):
    return _load_checkpoint(path, model, None)  # AdamW restarts with empty moments


def _load_without_dropout_rng(path, model=None, optimizer=None):
    meta, rng = _load_checkpoint(path, model, optimizer)
    return meta, {**rng, "torch": torch.get_rng_state()}  # dropout masks drawn from a fresh stream


def resume_reseeds_batch_generator(**case):
    with patch.object(impl.train.loop, "load_checkpoint", _reseeding_load):
        return resume.resumed(**case)


def resume_forgets_optimizer_state(**case):
    with patch.object(impl.train.loop, "load_checkpoint", _load_without_optimizer):
        return resume.resumed(**case)


def resume_forgets_dropout_rng(**case):
    with patch.object(impl.train.loop, "load_checkpoint", _load_without_dropout_rng):
        return resume.resumed(**case)


# --- parameter count ----------------------------------------------------------------------------

def formula_without_position_embeddings(vocab_size, block_size, n_layer, n_head, n_embd):
    return param_count(vocab_size, block_size, n_layer, n_head, n_embd) - block_size * n_embd


def formula_counts_tied_head_twice(vocab_size, block_size, n_layer, n_head, n_embd):
    return param_count(vocab_size, block_size, n_layer, n_head, n_embd) + vocab_size * n_embd
