"""The MoE feed-forward layer of the shared GPT, plugged in through ``impl.gpt.model``'s FFN seam.

Configuration lives in the FFN name, so ``GPTConfig`` stays as it is and a saved model's config says what it is:

    GPTConfig(ffn="moe:e16:k2:c1.25")     # 16 experts, top-2, capacity factor 1.25

Fields after ``moe``, in any order: ``e<E>`` experts (required), ``k<k>`` top-k (default 1), ``c<f>`` capacity
factor (default 1.25; ``c0``: no limit), ``h<H>`` expert hidden width (default 4 * n_embd, GPT-2's MLP),
``a<alpha>`` load-balancing weight (default 0.01, Switch), ``n<std>`` router noise in training (default 0),
``raw`` / ``renorm`` the gate (default: renormalized over the top-k when k > 1, the raw probability for
top-1, as Switch), ``fall`` the balancing loss counting all k choices (default: first choices, Switch).

``import impl.moe`` makes every such name resolvable by ``impl.gpt.model.get_ffn`` (``install_resolver``), so a
model saved with ``ffn="moe:..."`` loads with ``GPT.from_state`` after that import; ``register(...)`` builds the
canonical name from keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from impl.gpt import model as gpt_model
from impl.gpt.model import GPTConfig
from impl.moe import fast
from impl.moe.router import load_balancing_loss

PREFIX = "moe"


@dataclass(frozen=True)
class MoESettings:
    """What an ``moe:...`` FFN name says (see the module docstring); ``hidden=None`` means 4 * n_embd."""

    n_experts: int
    top_k: int = 1
    capacity_factor: float | None = 1.25
    hidden: int | None = None
    alpha: float = 0.01
    noise_std: float = 0.0
    renormalize: bool | None = None  # None: renormalize when top_k > 1
    aux_choices: str = "first"

    @property
    def renormalized(self) -> bool:
        """Whether gates are renormalized over the chosen top-k."""
        return self.top_k > 1 if self.renormalize is None else self.renormalize

    def name(self) -> str:
        """The canonical FFN name of these settings (``parse(s.name()) == s``)."""
        cf = 0 if self.capacity_factor is None else self.capacity_factor
        parts = [PREFIX, f"e{self.n_experts}", f"k{self.top_k}", f"c{cf:g}"]
        if self.hidden is not None:
            parts.append(f"h{self.hidden}")
        if self.alpha != 0.01:
            parts.append(f"a{self.alpha:g}")
        if self.noise_std:
            parts.append(f"n{self.noise_std:g}")
        if self.renormalize is not None:
            parts.append("renorm" if self.renormalize else "raw")
        if self.aux_choices == "all":
            parts.append("fall")
        return ":".join(parts)


def parse(name: str) -> MoESettings:
    """The settings an ``moe:...`` FFN name spells; ``ValueError`` naming the field it cannot read."""
    fields = name.split(":")
    if fields[0] != PREFIX:
        raise ValueError(f"not an MoE ffn name: {name!r}")
    kw: dict = {}
    for f in fields[1:]:
        try:
            if f in ("raw", "renorm"):
                kw["renormalize"] = f == "renorm"
            elif f == "fall":
                kw["aux_choices"] = "all"
            elif f[0] == "e":
                kw["n_experts"] = int(f[1:])
            elif f[0] == "k":
                kw["top_k"] = int(f[1:])
            elif f[0] == "c":
                kw["capacity_factor"] = float(f[1:]) or None
            elif f[0] == "h":
                kw["hidden"] = int(f[1:])
            elif f[0] == "a":
                kw["alpha"] = float(f[1:])
            elif f[0] == "n":
                kw["noise_std"] = float(f[1:])
            else:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"MoE ffn name {name!r}: cannot read field {f!r} (see impl.moe.layer)") from None
    if "n_experts" not in kw:
        raise ValueError(f"MoE ffn name {name!r} lacks the expert count (e.g. 'moe:e8:k2')")
    s = MoESettings(**kw)
    if not 1 <= s.top_k <= s.n_experts:
        raise ValueError(f"MoE ffn name {name!r}: top_k must be in [1, n_experts]")
    return s


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward: a router and ``E`` GPT-2-MLP experts (weights stacked per expert).

    ``forward`` sets ``aux_loss`` (the load-balancing loss, ``GPT.aux_loss`` sums it into the training loss)
    and ``last_load`` (E,) the assignments each expert kept in that forward. After ``expert_parallel.shard``
    the layer holds only its rank's experts and exchanges tokens with the other ranks."""

    def __init__(self, config: GPTConfig, settings: MoESettings):
        super().__init__()
        c = config.n_embd
        h = settings.hidden or 4 * c
        e = settings.n_experts
        self.settings = settings
        self.router = nn.Linear(c, e, bias=False)
        std_proj = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2's residual-projection scaling
        self.w_fc = nn.Parameter(torch.randn(e, c, h) * 0.02)
        self.b_fc = nn.Parameter(torch.zeros(e, h))
        self.w_proj = nn.Parameter(torch.randn(e, h, c) * std_proj)
        self.b_proj = nn.Parameter(torch.zeros(e, c))
        self.dropout = nn.Dropout(config.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.expert_group = None  # set by expert_parallel.shard
        self.sharded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        b, t, c = x.shape
        flat = x.reshape(b * t, c)
        args = (flat, self.router.weight, self.w_fc, self.b_fc, self.w_proj, self.b_proj)
        if self.sharded:
            from impl.moe.expert_parallel import moe_ffn_ep

            y, routing, kept = moe_ffn_ep(*args, s.n_experts, s.top_k, s.capacity_factor, s.renormalized,
                                          s.noise_std, self.training, self.expert_group)
        else:
            y, routing, kept = fast.moe_ffn(*args, s.top_k, s.capacity_factor, s.renormalized, s.noise_std,
                                            self.training)
        self.aux_loss = load_balancing_loss(routing.probs, routing.experts, s.alpha, s.aux_choices)
        self.last_load = torch.bincount(routing.experts[kept], minlength=s.n_experts).detach()
        return self.dropout(y.view(b, t, c))


def factory(name: str):
    """The ``register_ffn`` factory of an ``moe:...`` name."""
    settings = parse(name)
    return lambda config: MoE(config, settings)


def register(n_experts: int, top_k: int = 1, capacity_factor: float | None = 1.25, **kw) -> str:
    """Register the MoE FFN with these settings (``MoESettings``' fields) and return its name for
    ``GPTConfig(ffn=...)``."""
    name = MoESettings(n_experts, top_k, capacity_factor, **kw).name()
    gpt_model.register_ffn(name, factory(name))
    return name


class _ResolvingRegistry(dict):
    """The FFN registry of ``impl.gpt.model`` that also answers any well-formed ``moe:...`` name on first use."""

    def __contains__(self, name: object) -> bool:
        if not dict.__contains__(self, name) and isinstance(name, str) and name.startswith(PREFIX + ":"):
            try:
                self[name] = factory(name)
            except ValueError:
                return False
        return dict.__contains__(self, name)


def install_resolver() -> None:
    """Make ``impl.gpt.model.get_ffn`` resolve ``moe:...`` names (done on ``import impl.moe``)."""
    if not isinstance(gpt_model._FFNS, _ResolvingRegistry):
        gpt_model._FFNS = _ResolvingRegistry(gpt_model._FFNS)
