"""Distilling a student GPT from frozen teachers with the shared training loop.

The shared loop (``impl.train.loop.train``) minimises ``lm_loss(model(x), y) + model.aux_loss()`` and
takes no loss function; it cannot be edited (its code is hashed into the model cache). ``Distiller``
plugs into that seam instead: a module whose forward returns the student's logits (the loop's
language-model loss) and which sets, on every forward with gradients enabled, the distillation terms
as its ``aux_loss``:

    loop loss = LM + alpha / (1 - alpha) * KD + beta * FEAT
              = [(1 - alpha) * LM + alpha * KD] / (1 - alpha) + beta * FEAT

The bracket is Hinton's weighted objective; the constant factor 1 / (1 - alpha) leaves AdamW's step
unchanged (Adam divides by the gradient's running RMS: a constant factor cancels, up to eps = 1e-8),
and ``distill_config`` scales ``grad_clip`` by the same factor so clipping acts where it would on the
weighted objective. The teachers run under ``no_grad`` inside the step, on the very batch the student
sees; under ``torch.no_grad`` (the loop's evaluations) the Distiller is the student alone, so the
loop's val loss is the student's language-model loss.

Teachers are kept out of the module tree (a plain tuple): the loop's optimizer, ``model.train()`` and
gradient clipping never see them. The feature projections are ordinary parameters and train.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.distillation import fast, naive
from impl.gpt.model import GPT, GPTConfig
from impl.train.loop import TrainConfig, TrainResult, train

LOSSES = {"naive": naive, "fast": fast}


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student state, teacher state) pairs of ``hidden_states`` indices: student block i (1-based) is
    matched to teacher block round(i * teacher_layers / student_layers), the last to the last."""
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def _real_positions(idx: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """(B, T) bool of the positions holding real tokens of a padded (``attention_mask``) or packed
    (``segment_ids``, 0 = padding) batch, None for a plain batch: padding is left out of the soft targets
    as the loop leaves it out of the language-model loss."""
    if kwargs.get("segment_ids") is not None:
        return kwargs["segment_ids"] > 0
    if kwargs.get("attention_mask") is not None:
        return kwargs["attention_mask"][:, -idx.shape[1]:].bool()
    return None


class Distiller(nn.Module):
    """A student GPT plus frozen teachers; forward returns the student's logits (B, T, V) and sets
    ``aux_loss()`` to ``alpha / (1 - alpha) * KD`` (+ ``beta * feature MSE``) when gradients are on.

    ``teachers``: GPTs sharing the student's vocabulary; more than one is multi-teacher distillation
    (soft targets = the ``weights``-weighted mixture of their softened distributions). ``beta > 0``
    adds feature distillation against the first teacher's hidden states (``layer_map``), each through a
    learned linear projection of the student's state (normalised: LayerNorm without affine on both sides,
    so the target's scale, which grows with depth, does not set the term's weight)."""

    def __init__(self, student: GPT, teachers: Sequence[GPT], temperature: float = 2.0, alpha: float = 0.5,
                 beta: float = 0.0, weights: Sequence[float] | None = None, impl: str = "fast"):
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1) (the weight of the KD term), got {alpha}")
        if not teachers:
            raise ValueError("distillation needs at least one teacher")
        for t in teachers:
            if t.config.vocab_size != student.config.vocab_size:
                raise ValueError(f"a teacher has {t.config.vocab_size} ids, the student {student.config.vocab_size}: "
                                 "logit distillation needs one vocabulary (the same tokenizer)")
            t.requires_grad_(False).eval()
        self.student = student
        self.teachers = tuple(teachers)  # a tuple, not a ModuleList: no optimizer, no train(), no clipping
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.losses = LOSSES[impl]
        self.pairs = layer_map(student.config.n_layer, teachers[0].config.n_layer) if beta > 0 else []
        self.projections = nn.ModuleList(
            nn.Linear(student.config.n_embd, teachers[0].config.n_embd) for _ in self.pairs)
        self._aux: torch.Tensor | None = None

    @property
    def config(self):
        """The student's config (the loop and callers read ``model.config``)."""
        return self.student.config

    def kd_scale(self) -> float:
        """The factor alpha / (1 - alpha) the loop's loss carries on the KD term (see the module docstring)."""
        return self.alpha / (1.0 - self.alpha)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: the student alone
            self._aux = None
            return self.student(idx, **kwargs)
        with torch.no_grad():
            if self.beta > 0:
                t_states = self.teachers[0].hidden_states(idx, **kwargs)
                t_logits = [self.teachers[0].head(t_states[-1])] + [t(idx, **kwargs) for t in self.teachers[1:]]
            else:
                t_logits = [t(idx, **kwargs) for t in self.teachers]
        if self.beta > 0:
            states = self.student.hidden_states(idx, **kwargs)
            logits = self.student.head(states[-1])
        else:
            logits = self.student(idx, **kwargs)
        real = _real_positions(idx, kwargs)  # (B, T) bool, or None: every position is a real token
        pick = (lambda z: z) if real is None else (lambda z: z[real])  # (B, T, C) -> (N_real, C)
        aux = torch.zeros((), device=idx.device)
        if self.alpha > 0:
            if len(t_logits) == 1:
                kd = self.losses.kd_loss(pick(logits), pick(t_logits[0]), self.temperature)
            else:
                kd = self.losses.multi_teacher_kd_loss(pick(logits), torch.stack([pick(t) for t in t_logits]),
                                                       self.temperature, self.weights)
            aux = aux + self.kd_scale() * kd
        for proj, (i, j) in zip(self.projections, self.pairs, strict=True):
            h_s = F.layer_norm(pick(states[i]).float(), (states[i].shape[-1],))
            h_t = F.layer_norm(pick(t_states[j]).float(), (t_states[j].shape[-1],))
            feat = self.losses.feature_loss(h_s, h_t, proj.weight, proj.bias)
            aux = aux + self.beta * feat / len(self.pairs)
        self._aux = aux
        return logits

    def aux_loss(self) -> torch.Tensor | None:
        """The distillation terms of the last forward with gradients (None after an evaluation)."""
        own = self.student.aux_loss()
        if self._aux is None:
            return own
        return self._aux if own is None else self._aux + own


def distill_config(cfg: TrainConfig, alpha: float) -> TrainConfig:
    """``cfg`` with ``grad_clip`` scaled by 1 / (1 - alpha): the loop's loss is the weighted objective
    times that factor (see the module docstring), so this clips the same update."""
    return replace(cfg, grad_clip=cfg.grad_clip / (1.0 - alpha)) if cfg.grad_clip > 0 else cfg


def distill(student: GPT, teachers: Sequence[GPT], train_ids: np.ndarray, val_ids: np.ndarray, cfg: TrainConfig,
            temperature: float = 2.0, alpha: float = 0.5, beta: float = 0.0, weights: Sequence[float] | None = None,
            impl: str = "fast", progress: bool = False) -> TrainResult:
    """Train ``student`` in place against ``teachers`` with the shared loop (``cfg``: same batches, schedule
    and evaluations as a from-scratch run with the same ``cfg``); returns the loop's result, whose losses are
    the student's language-model losses."""
    model = Distiller(student, teachers, temperature, alpha, beta, weights, impl)
    model.to(next(student.parameters()).device)
    return train(model, train_ids, val_ids, distill_config(cfg, alpha), progress=progress)


def distill_on_tasks(student: GPT, teachers: Sequence[GPT], examples: Sequence, sft_cfg, pad: int = 0,
                     temperature: float = 2.0, alpha: float = 0.5, impl: str = "fast", progress: bool = False):
    """Task-specific distillation: fine-tune ``student`` in place on instruction ``examples`` (project 4's
    ``impl.sft.fast.Example``s, packed or padded by ``impl.sft.fast.finetune``) with soft targets from
    ``teachers`` (e.g. the ``chat`` model, bpe-base fine-tuned on those tasks) on every real token, and the
    usual SFT loss on the answers. Returns ``finetune``'s ``SFTResult``."""
    from impl.sft.fast import finetune

    model = Distiller(student, teachers, temperature, alpha, impl=impl)
    cfg = replace(sft_cfg, grad_clip=sft_cfg.grad_clip / (1.0 - alpha)) if sft_cfg.grad_clip > 0 else sft_cfg
    return finetune(model, examples, cfg, pad, progress)


def student_like(config: dict, seed: int) -> GPT:
    """A freshly initialised GPT of shape ``config`` (a ``GPTConfig`` dict), fp32, seeded: the same
    seed gives the same initial weights, so a scratch and a distilled student start identical."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**copy.deepcopy(config))).float()
