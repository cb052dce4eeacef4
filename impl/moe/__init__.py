"""Project 21: Mixture-of-Experts feed-forward layers for the shared GPT.

- ``router``: top-k gating (optional noise), capacity, the Switch load-balancing loss;
- ``naive`` / ``fast``: the MoE feed-forward as loops over tokens and experts / as grouped batched matmuls;
- ``layer``: the ``MoE`` module and its FFN names (``GPTConfig(ffn="moe:e16:k2:c1.25")``);
- ``expert_parallel``: experts sharded over ``torch.distributed`` ranks, all-to-all dispatch;
- ``python -m impl.moe``: the CLI (under torchrun: expert-parallel training steps).

Importing this package makes every ``moe:...`` FFN name resolvable (``layer.install_resolver``).
"""

from impl.moe.layer import MoE, MoESettings, install_resolver, parse, register

install_resolver()

__all__ = ["MoE", "MoESettings", "parse", "register"]
