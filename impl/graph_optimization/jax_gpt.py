"""The shared GPT's forward in ``jax.numpy``, compiled whole by XLA (``jax.jit``).

Weights come from the torch state dict (``params_from_state``: names kept, ``nn.Linear`` weights
transposed once to (in, out) so every projection is ``x @ w + b``). The maths is ``impl/gpt/model.py``'s:
pre-norm blocks, fused q/k/v projection, causal softmax attention, tanh-approximated GELU (GPT-2's
"gelu_new"), LayerNorm eps 1e-5, the head tied to the token embedding unless the state has its own.

``jax.jit`` traces ``forward`` once per input shape and hands XLA the whole graph: it fuses the
elementwise chains (bias + GELU, the LayerNorm statistics, scale + mask + softmax) into loops around the
matmuls, with no Python between operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

LN_EPS = 1e-5  # nn.LayerNorm's default


def params_from_state(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, jax.Array]:
    """fp32 jax arrays of ``state``, linear weights as (in, out); ``lm_head.w`` is the embedding
    transposed when tied."""
    params: dict[str, jax.Array] = {}
    for name, tensor in state.items():
        array = tensor.detach().float().cpu().numpy()
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "lm_head.weight")):
            params[name[: -len("weight")] + "w"] = jnp.asarray(array.T)
        else:
            params[name] = jnp.asarray(array)
    if "lm_head.w" not in params:  # tied: the state holds the embedding only
        params["lm_head.w"] = params["wte.weight"].T
    return params


def layer_norm(x: jax.Array, params: dict[str, jax.Array], prefix: str) -> jax.Array:
    """LayerNorm over the last axis with the weight (and bias, if the model has one) at ``prefix``."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + LN_EPS) * params[f"{prefix}.weight"]
    bias = params.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def linear(x: jax.Array, params: dict[str, jax.Array], prefix: str) -> jax.Array:
    """``x @ w (+ b)`` of the linear layer at ``prefix``."""
    y = x @ params[f"{prefix}.w"]
    bias = params.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def gelu(x: jax.Array) -> jax.Array:
    """GPT-2's GELU, the tanh approximation (torch ``GELU(approximate="tanh")``)."""
    return jax.nn.gelu(x, approximate=True)


def attention(x: jax.Array, params: dict[str, jax.Array], prefix: str, head_dim: int) -> jax.Array:
    """Causal self-attention of x (B, T, C); heads read from the fused projection's width."""
    B, T, _ = x.shape
    q, k, v = jnp.split(linear(x, params, f"{prefix}.c_attn"), 3, axis=-1)  # each (B, T, nh * hs)
    q, k, v = (t.reshape(B, T, -1, head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, nh, T, hs)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)  # (B, nh, T, T)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    y = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)  # (B, T, nh * hs)
    return linear(y, params, f"{prefix}.c_proj")


def forward(params: dict[str, jax.Array], idx: jax.Array, n_layer: int, head_dim: int,
            activation: Callable[[jax.Array], jax.Array] = gelu) -> jax.Array:
    """Logits (B, T, vocab) for token ids ``idx`` (B, T): the GPT forward without a cache. ``activation``
    is the MLP's (static under ``jax.jit``: another function compiles another graph)."""
    T = idx.shape[1]
    x = params["wte.weight"][idx] + params["wpe.weight"][jnp.arange(T)]  # (B, T, C)
    for i in range(n_layer):
        p = f"blocks.{i}"
        x = x + attention(layer_norm(x, params, f"{p}.ln_1"), params, f"{p}.attn", head_dim)
        h = activation(linear(layer_norm(x, params, f"{p}.ln_2"), params, f"{p}.mlp.c_fc"))
        x = x + linear(h, params, f"{p}.mlp.c_proj")
    return layer_norm(x, params, "ln_f") @ params["lm_head.w"]


compiled_forward = jax.jit(forward, static_argnames=("n_layer", "head_dim", "activation"))


class JaxGPT:
    """A GPT's weights as jax arrays and its jitted forward (compiled per input shape on first call)."""

    def __init__(self, config: dict[str, Any], state: dict[str, torch.Tensor],
                 activation: Callable[[jax.Array], jax.Array] = gelu):
        self.activation = activation
        self.params = params_from_state(config, state)
        self.n_layer = config["n_layer"]
        self.head_dim = config["n_embd"] // config["n_head"]
        self.block_size = config["block_size"]

    def __call__(self, idx: np.ndarray) -> jax.Array:
        """Logits (B, T, vocab) of ids (B, T), computed by XLA (asynchronously: ``block_until_ready``)."""
        if idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds block_size {self.block_size}")
        return compiled_forward(self.params, jnp.asarray(idx), n_layer=self.n_layer, head_dim=self.head_dim,
                                activation=self.activation)


def logits(config: dict[str, Any], state: dict[str, torch.Tensor], idx: torch.Tensor,
           activation: Callable[[jax.Array], jax.Array] = gelu) -> torch.Tensor:
    """The check's entry point: fp32 logits (B, T, vocab) of ``idx`` by the jitted JAX port, as a torch tensor."""
    out = JaxGPT(config, state, activation)(idx.numpy())
    return torch.from_numpy(np.asarray(out.block_until_ready()).copy())
