"""Cases and properties for project 27: small random GPTs with random exit heads, thresholds inside the
confidences those heads give (some tokens exit, some do not), and a cache-free oracle that recomputes a
whole early-exit generation from its tokens and exit layers: every layer's K/V at every position (the
skipped layers' from the copied exit state), every checked confidence, every emitted logit."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from harness.cases import Cases
from impl.early_exit.heads import ExitHeads, confidence, heads_from_state
from impl.gpt.model import GPT
from tests.cases.gpt import random_gpt

GAIN = 3  # typical LayerNorm gain of a random exit head
TOL = 1e-5  # confidences this close to the threshold may fall either side in float32: not judged


def exit_case(seed: int, n_layer: int, n_head: int, head_dim: int, prompt_len: int, max_new_tokens: int,
              quantile: float | None = 0.5, measure: str = "max_prob", rank: int = 4, vocab_size: int = 48,
              bias: bool = True, threshold: float | None = None, id: str | None = None) -> dict[str, Any]:
    """A random GPT, random exit heads (LayerNorm gains of about ``GAIN``, so the heads' confidences spread)
    and a prompt. Without ``threshold``, it sits at ``quantile`` of the steps' highest head confidence in
    the full model's greedy run, between two of them."""
    config, state = random_gpt(seed, n_layer, n_head, head_dim, vocab_size, prompt_len + max_new_tokens, bias)
    model = GPT.from_state(config, state)
    heads = ExitHeads.for_model(model, rank)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name.startswith("norms") and name.endswith("weight"):
                p.copy_(torch.exp(0.5 * torch.randn(p.shape, generator=gen)) * GAIN)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    prompt = torch.randint(vocab_size, (1, prompt_len), generator=gen)
    if threshold is None:  # from the full model's own greedy run: the first exit chance of about 1 - quantile
        with torch.no_grad():  # of its steps comes at or above it
            seq = prompt
            for _ in range(max_new_tokens - 1):
                seq = torch.cat([seq, model(seq)[:, -1:].argmax(dim=-1)], dim=1)
            states = model.hidden_states(seq)
            confs = torch.stack([confidence(heads.logits(layer, states[layer][0, prompt_len - 1:], model), measure)
                                 for layer in range(1, n_layer)]).max(dim=0).values.sort().values  # (steps,)
        i = min(int(quantile * len(confs)), len(confs) - 2) if len(confs) > 1 else 0
        threshold = float(confs[i:i + 2].mean())  # between two seen values, never equal to one
    case = {"config": config, "state": state, "heads_state": {k: v.clone() for k, v in heads.state_dict().items()},
            "prompt": prompt, "max_new_tokens": max_new_tokens, "threshold": threshold, "measure": measure}
    return case | ({"id": id} if id else {})


_MEASURES = st.sampled_from(["max_prob", "margin", "entropy"])

never_exit = Cases(
    edge=[
        exit_case(0, 3, 2, 8, 5, 12, threshold=1.5, id="3-layers"),
        exit_case(1, 6, 4, 4, 3, 20, threshold=1.0001, measure="entropy", id="6-layers-entropy-just-above-1"),
        exit_case(2, 2, 1, 8, 1, 8, threshold=2.0, measure="margin", rank=0, id="one-token-prompt-no-adapter"),
        exit_case(3, 4, 2, 8, 7, 1, threshold=1.5, bias=False, id="one-new-token-no-bias"),
    ],
    strategy=st.builds(exit_case, seed=st.integers(0, 2**16), n_layer=st.integers(2, 5), n_head=st.integers(1, 4),
                       head_dim=st.sampled_from([4, 8]), prompt_len=st.integers(1, 8),
                       max_new_tokens=st.integers(1, 16), measure=_MEASURES, rank=st.sampled_from([0, 4]),
                       threshold=st.sampled_from([1.0001, 1.5, 10.0]), bias=st.booleans()),
)

exiting = Cases(
    edge=[
        exit_case(10, 4, 2, 8, 5, 16, quantile=0.5, id="4-layers-median"),
        exit_case(11, 6, 2, 8, 4, 24, quantile=0.3, measure="entropy", id="6-layers-entropy"),
        exit_case(12, 5, 2, 4, 3, 20, quantile=0.7, measure="margin", id="5-layers-margin"),
        exit_case(13, 4, 2, 8, 4, 12, threshold=0.0, id="threshold-0-every-token-exits-first-chance"),
        exit_case(14, 3, 1, 8, 1, 16, quantile=0.5, rank=0, bias=False, id="one-token-prompt-no-bias"),
    ],
    strategy=st.builds(exit_case, seed=st.integers(0, 2**16), n_layer=st.integers(2, 5), n_head=st.integers(1, 4),
                       head_dim=st.sampled_from([4, 8]), prompt_len=st.integers(1, 8),
                       max_new_tokens=st.integers(2, 16), quantile=st.floats(0.1, 0.9), measure=_MEASURES,
                       rank=st.sampled_from([0, 4]), bias=st.booleans()),
)


# ---------------------------------------------------------------- the cache-free oracle


@torch.no_grad()
def recompute(model: GPT, heads: ExitHeads, tokens: torch.Tensor, prompt_len: int,
              exit_layers: torch.Tensor) -> dict[str, Any]:
    """Every layer's state, keys and values of an early-exit generation, from scratch with causal attention
    over the whole sequence (no cache): position p runs block l only if it exits at or after l; a position
    that exited keeps its exit state, and a skipped layer's K/V come from that state."""
    L = model.config.n_layer
    n = len(exit_layers)
    N = prompt_len + n - 1  # positions that went through the model (the last new token never did)
    exits = torch.cat([torch.full((prompt_len - 1,), L), exit_layers])[:N]  # (N,)
    x = model.wte(tokens[:, :N]) + model.wpe(torch.arange(N))  # (1, N, C)
    states, keys, values = [x], [], []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = attn.c_attn(block.ln_1(x)).split(model.config.n_embd, dim=2)
        q, k, v = (t.view(1, N, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # (1, nh, N, hs)
        keys.append(k[0])
        values.append(v[0])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, N, -1)
        ran = x + attn.c_proj(y)
        ran = ran + block.mlp(block.ln_2(ran))
        x = torch.where((exits > i).view(1, N, 1), ran, x)  # exited before block i + 1: the state is copied up
        states.append(x)
    return {"states": states, "keys": torch.stack(keys), "values": torch.stack(values), "exits": exits, "N": N}


def _models(config: dict, state: dict, heads_state: dict) -> tuple[GPT, ExitHeads]:
    model = GPT.from_state(config, state)
    return model, heads_from_state(model.config.n_layer, model.config.n_embd, heads_state)


def exits_honour_threshold(fn: Callable, config: dict, state: dict, heads_state: dict, prompt: torch.Tensor,
                           max_new_tokens: int, threshold: float, measure: str) -> None:
    """Property: every token left at a layer whose (recomputed) confidence is >= the threshold, or ran every
    block; every checked layer before its exit was < the threshold; the recorded confidences and logits are
    the oracle's, and the emitted token is their argmax."""
    out = fn(config, state, heads_state, prompt, max_new_tokens, threshold, measure)
    model, heads = _models(config, state, heads_state)
    L, T = model.config.n_layer, prompt.shape[1]
    assert out.exit_layers.shape == (max_new_tokens,), f"{len(out.exit_layers)} exit layers for {max_new_tokens}"
    ref = recompute(model, heads, out.tokens, T, out.exit_layers)
    for i, e in enumerate(out.exit_layers.tolist()):
        p = T - 1 + i
        assert 1 <= e <= L, f"token {i} exits at layer {e}, outside 1..{L}"
        recorded = out.confidences[i]
        checked = ~torch.isnan(recorded)
        assert not checked[e:].any(), f"token {i} exits at layer {e} but has confidences recorded after it"
        with torch.no_grad():
            conf = [math.nan] + [confidence(heads.logits(j, ref["states"][j][0, p], model), measure).item()
                                 for j in range(1, e + 1 if e < L else L)]
            logits = heads.logits(e, ref["states"][e][0, p], model)
        for j in range(1, e if e < L else L):
            if checked[j - 1]:
                assert abs(recorded[j - 1].item() - conf[j]) < 1e-4, \
                    f"token {i}, layer {j}: recorded confidence {recorded[j - 1].item():.6f}, oracle {conf[j]:.6f}"
                assert conf[j] < threshold + TOL, (f"token {i} went past layer {j} whose confidence {conf[j]:.6f} "
                                                   f">= threshold {threshold:.6f}")
        if e < L:
            assert checked[e - 1], f"token {i} exits at layer {e}, where no confidence was checked"
            assert conf[e] >= threshold - TOL, (f"token {i} exits at layer {e} with confidence {conf[e]:.6f} "
                                                f"< threshold {threshold:.6f}")
        assert torch.allclose(out.logits[i], logits, rtol=1e-4, atol=1e-4), \
            f"token {i}: logits differ from the oracle's by {(out.logits[i] - logits).abs().max().item():.3g}"
        assert out.tokens[0, T + i] == out.logits[i].argmax(), f"token {i} is not the argmax of its logits"


def cache_full_and_recomputable(fn: Callable, config: dict, state: dict, heads_state: dict, prompt: torch.Tensor,
                                max_new_tokens: int, threshold: float, measure: str) -> None:
    """Property: after generation the cache holds every layer's K/V for every position that went through
    the model, none left at zero, each equal to the oracle's (a skipped layer's computed from the copied
    exit state), and its position counts exactly those positions."""
    out = fn(config, state, heads_state, prompt, max_new_tokens, threshold, measure)
    model, heads = _models(config, state, heads_state)
    ref = recompute(model, heads, out.tokens, prompt.shape[1], out.exit_layers)
    N = ref["N"]
    assert out.cache.position == N, f"cache position {out.cache.position}, expected {N}"
    k, v = out.cache.k[:, 0, :, :N], out.cache.v[:, 0, :, :N]  # (L, nh, N, hs)
    empty = (k.abs().sum(dim=-1) == 0) | (v.abs().sum(dim=-1) == 0)  # (L, nh, N)
    assert not empty.any(), (f"{int(empty.any(dim=1).sum())} (layer, position) slots left at zero, e.g. layer, "
                             f"position {[int(t) for t in empty.any(dim=1).nonzero()[0]]}")
    for name, got, want in (("keys", k, ref["keys"]), ("values", v, ref["values"])):
        err = (got - want).abs()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (
            f"cached {name} differ from the recomputed ones by up to {err.max().item():.3g} "
            f"(layer, position {[int(t) for t in (err == err.max()).nonzero()[0][[0, 2]]]}); exits "
            f"{ref['exits'].tolist()}")
