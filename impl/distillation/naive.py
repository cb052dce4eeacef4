"""Knowledge-distillation losses written out from their formulas, loops of the math left visible.

Logit distillation (Hinton, Vinyals & Dean, 2015). Student logits ``s`` and teacher logits ``t`` over a
vocabulary of V ids at N positions, temperature T:

    p_t = softmax(t / T)                      the teacher's softened distribution (the "soft targets")
    p_s = softmax(s / T)                      the student's, at the same temperature
    L_KD = T^2 * (1 / N) * sum_n KL(p_t || p_s)
         = T^2 * (1 / N) * sum_n sum_v p_t[n, v] * (log p_t[n, v] - log p_s[n, v])

Why T^2: dL/ds of T^2 * KL is T * (p_s - p_t), and p_s - p_t shrinks like 1/T once T is large, so
the gradient of the soft term stays the same size whatever T (section 2 of the paper); without the factor
it would fade like 1/T^2 and T would silently reweight it against the hard-label loss.
Direction: KL(p_t || p_s), the teacher's distribution first (a cross-entropy against the soft targets
minus the teacher's own entropy), as torch's ``kl_div(log p_s, log p_t, log_target=True)`` computes it.

Multi-teacher: the soft targets are the weighted mixture ``sum_k w_k * softmax(t_k / T)`` of the teachers'
softened distributions (weights summing to 1; equal weights by default), then the same loss.

Feature distillation (FitNets, Romero et al., 2015): a learned projection ``W h_s + b`` of the student's
hidden state onto the teacher's width, and the mean squared error to the teacher's hidden state.
"""

from __future__ import annotations

import torch


def _compute_dtype(z: torch.Tensor) -> torch.Tensor:
    """Logits in fp32 at least: a bf16 / fp16 softmax over thousands of ids loses the tail."""
    return z if z.dtype == torch.float64 else z.float()


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension, written out: z - max - log(sum(exp(z - max)))."""
    shifted = z - z.max(dim=-1, keepdim=True).values  # the largest exponent is 0: no overflow
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of every row (..., V) -> (...), from log-probabilities; a term with p = 0 is 0 (0 log 0 = 0),
    even where log p = -inf (a mixture no teacher gives any mass to at a tiny temperature)."""
    p = torch.exp(log_p)
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def soft_target_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(p_target || softmax(s / T)); the target given as log-probabilities."""
    vocab = student_logits.shape[-1]
    s = _compute_dtype(student_logits).reshape(-1, vocab)  # (N, V)
    log_p_t = teacher_log_probs.detach().reshape(-1, vocab).to(s.dtype)
    log_p_s = log_softmax(s / temperature)
    return temperature**2 * kl_rows(log_p_t, log_p_s).sum() / s.shape[0]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss T^2 * mean_n KL(softmax(t / T) || softmax(s / T)), a scalar.

    ``student_logits`` and ``teacher_logits``: (..., V), the same shape; the mean is over every position
    (all dimensions but the last)."""
    t = _compute_dtype(teacher_logits.detach())  # the teacher is a constant target: no gradient to it
    return soft_target_loss(student_logits, log_softmax(t / temperature), temperature)


def mixture_log_probs(teacher_logits: torch.Tensor, temperature: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """log of the weighted mixture of K softened teacher distributions: teacher_logits (K, ..., V) -> (..., V)."""
    t = _compute_dtype(teacher_logits.detach())
    k = t.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=t.dtype) if weights is None else weights.to(t.dtype)
    mixture = torch.zeros_like(t[0])
    for i in range(k):  # sum_k w_k * softmax(t_k / T)
        mixture = mixture + w[i] * torch.exp(log_softmax(t[i] / temperature))
    return torch.log(mixture)


def multi_teacher_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean_n KL(sum_k w_k softmax(t_k / T) || softmax(s / T)), a scalar.

    ``teacher_logits``: (K, ..., V), K teachers stacked; ``weights``: (K,) summing to 1, or None for 1/K each."""
    return soft_target_loss(student_logits, mixture_log_probs(teacher_logits, temperature, weights), temperature)


def feature_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over every element of (h_s W^T + b - h_t)^2: student_hidden (..., Cs), teacher_hidden (..., Ct),
    weight (Ct, Cs), bias (Ct,) or None; a scalar."""
    projected = student_hidden @ weight.T  # (..., Ct)
    if bias is not None:
        projected = projected + bias
    diff = projected - teacher_hidden
    return (diff * diff).sum() / diff.numel()
