"""Tensor parallelism (Megatron-LM): the GPT's linears, embedding and LM head split across ranks.

- ``layers``: column- / row-parallel linears, vocab-parallel embedding / head / cross-entropy, the
  autograd-aware collectives ``f`` and ``g``, a log of the bytes every collective sends;
- ``shard``: ``shard_gpt(model, rank, world)`` turns a GPT into its shard by replacing modules;
- ``train``: one training step on ``world`` ranks, and the single-process step it equals.
"""
