"""Mutants of project 18: distillation losses with the T^2 factor dropped, the KL reversed, the student
not softened, a hand-written gradient missing its T, teachers mixed in logit space, a feature MSE summed
over channels. Each must be rejected by a check of specs/18_distillation.toml."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from impl.distillation import fast


def kd_without_t_squared(student_logits, teacher_logits, temperature):
    """KL(p_t || p_s) at temperature T without the T^2 factor: the soft term fades like 1/T^2."""
    return fast.kd_loss(student_logits, teacher_logits, temperature) / temperature**2


def kl_direction_swapped(student_logits, teacher_logits, temperature):
    """T^2 * KL(p_s || p_t): the student's distribution first (reverse KL, mode-seeking)."""
    v = student_logits.shape[-1]
    s, t = (z if z.dtype == torch.float64 else z.float() for z in (student_logits, teacher_logits))
    log_p_s = F.log_softmax(s.reshape(-1, v) / temperature, dim=-1)
    log_p_t = F.log_softmax(t.reshape(-1, v) / temperature, dim=-1)
    return temperature**2 * (log_p_s.exp() * (log_p_s - log_p_t)).sum() / log_p_s.shape[0]


def student_not_softened(student_logits, teacher_logits, temperature):
    """Softens only the teacher: KL(softmax(t / T) || softmax(s)), times T^2."""
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return fast.soft_target_loss(student_logits * temperature, log_p_t, temperature)


class _GradientWithoutT(torch.autograd.Function):
    """The fused loss with its closed-form gradient written as (p_s - p_t) / N: the factor T lost."""

    @staticmethod
    def forward(ctx, s, t, temperature):
        v = s.shape[-1]
        log_p_s = F.log_softmax(s.reshape(-1, v) / temperature, dim=-1)
        log_p_t = F.log_softmax(t.reshape(-1, v) / temperature, dim=-1)
        n = log_p_s.shape[0]
        ctx.save_for_backward((log_p_s.exp() - log_p_t.exp()) / n)
        ctx.shape = s.shape
        return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum() / n

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).reshape(ctx.shape), None, None


def gradient_without_temperature(student_logits, teacher_logits, temperature):
    """Forward right, backward (p_s - p_t) / N instead of T * (p_s - p_t) / N."""
    return _GradientWithoutT.apply(student_logits, teacher_logits.detach(), temperature)


def teachers_mixed_as_logits(student_logits, teacher_logits, temperature, weights=None):
    """Multi-teacher targets from the weighted mean of the teachers' logits, softened once, instead of the
    mean of their softened distributions."""
    k = teacher_logits.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=teacher_logits.dtype) if weights is None else weights
    mean_logits = (w.reshape(-1, *([1] * (teacher_logits.dim() - 1))) * teacher_logits).sum(0)
    return fast.kd_loss(student_logits, mean_logits, temperature)


def feature_mse_summed_over_channels(student_hidden, teacher_hidden, weight, bias=None):
    """Squared error summed over the teacher's channels, averaged over positions only."""
    diff = F.linear(student_hidden, weight, bias) - teacher_hidden
    return (diff**2).sum(-1).mean()
