"""Mutants of project 23, each a tensor-parallel step with one thing of Megatron's missing or wrong. The patch is
applied inside every rank (ranks are fresh processes: a patch in the parent would not reach them)."""

from __future__ import annotations

from unittest.mock import patch

import torch.nn.functional as F

from impl.tensor_parallelism import layers, train
from impl.tensor_parallelism.shard import split


def _no_row_all_reduce(self, x):
    y = F.linear(x, self.weight)  # each rank keeps its partial sum: the all-reduce (g) is missing
    return y if self.bias is None else y + self.bias


def _no_column_backward_all_reduce(self, x):
    return F.linear(x, self.weight, self.bias)  # no f: the input's gradient stays this rank's share


def _qkv_one_block(n_embd, head_dim, rank, world):
    (start, length), = split(3 * n_embd, rank, world, "3 * n_embd")  # rank 0: all of q and half of k
    return [(start, length)]


def _local_vocabulary_loss(local_logits, targets, start, group=None):
    # the loss's sums stay on each rank: a softmax over this rank's vocabulary slice only
    with patch.object(layers, "reduce_from_parallel", lambda x, group=None: x):
        return layers.vocab_parallel_cross_entropy(local_logits, targets, start, group)


def _rank_no_row_all_reduce(*args):
    with patch.object(layers.RowParallelLinear, "forward", _no_row_all_reduce):
        return train.tp_rank_step(*args)


def _rank_no_column_backward_all_reduce(*args):
    with patch.object(layers.ColumnParallelLinear, "forward", _no_column_backward_all_reduce):
        return train.tp_rank_step(*args)


def _rank_qkv_one_block(*args):
    with patch("impl.tensor_parallelism.shard.qkv_spans", _qkv_one_block):
        return train.tp_rank_step(*args)


def _rank_local_vocabulary_loss(*args):
    with patch.object(train, "vocab_parallel_cross_entropy", _local_vocabulary_loss):
        return train.tp_rank_step(*args)


def missing_row_all_reduce(config, state, idx, targets, lr=1e-2, world=2):
    """Row-parallel linears return each rank's partial product, never summed over the ranks."""
    return train.tp_step(config, state, idx, targets, lr, world, rank_fn=_rank_no_row_all_reduce)


def missing_column_backward_all_reduce(config, state, idx, targets, lr=1e-2, world=2):
    """Column-parallel linears skip f: forward is right, the input gradient is one rank's share only."""
    return train.tp_step(config, state, idx, targets, lr, world, rank_fn=_rank_no_column_backward_all_reduce)


def qkv_sliced_as_one_block(config, state, idx, targets, lr=1e-2, world=2):
    """c_attn's fused [q; k; v] rows split into contiguous thirds-by-rank, as if they were one matrix."""
    return train.tp_step(config, state, idx, targets, lr, world, rank_fn=_rank_qkv_one_block)


def loss_over_local_vocabulary(config, state, idx, targets, lr=1e-2, world=2):
    """The vocab-parallel loss without its all-reduces: each rank's softmax over its own vocabulary slice."""
    return train.tp_step(config, state, idx, targets, lr, world, rank_fn=_rank_local_vocabulary_loss)
