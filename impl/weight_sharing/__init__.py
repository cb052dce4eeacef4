"""Project 19, weight sharing: embedding-output tying, cross-layer (ALBERT) sharing, factorized
embeddings, and their parameter counts in closed form (see README.md)."""

from impl.weight_sharing.counts import counted_params, param_count
from impl.weight_sharing.factorized import factorize_embeddings
from impl.weight_sharing.sharing import layer_groups, share_layers, sharing_groups
from impl.weight_sharing.tying import untie

__all__ = ["counted_params", "factorize_embeddings", "layer_groups", "param_count", "share_layers",
           "sharing_groups", "untie"]
