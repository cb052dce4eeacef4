"""Knowledge-distillation losses, fused: one pass computes the loss and its gradient together.

Same losses as ``naive.py`` (T^2 * mean KL(p_t || p_s), the multi-teacher mixture, the feature MSE) and
the same signatures. What changes:

- ``_SoftTargetKL`` is an autograd function whose forward also writes the gradient w.r.t. the student
  logits in closed form, dL/ds = T * (p_s - p_t) / N, in place over log p_s, and keeps only that (N, V)
  tensor (in the logits' dtype) for backward: autograd through log_softmax, exp, subtract, multiply and
  sum would keep several (N, V) intermediates (on an 8 x 256 x 4096 batch each is 32 MiB in fp32) and
  replay five kernels in backward. The KL itself is one dot product (no where / multiply temporaries): on
  the CPU every (N, V) temporary costs about as much as the arithmetic.
- the teacher's log-probabilities come from ``torch.log_softmax`` (one fused kernel), and a mixture of
  teachers is one ``logsumexp`` over log w_k + log p_k in log space: no probability ever underflows to
  0 and is logged back.
- the teacher is a constant target (its logits come from a no-grad forward): no gradient goes to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _SoftTargetKL(torch.autograd.Function):
    """T^2 * mean_n KL(p_t || softmax(s / T)); forward saves the closed-form gradient w.r.t. ``s``."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                temperature: float) -> torch.Tensor:
        vocab = student_logits.shape[-1]
        n = student_logits.numel() // vocab
        log_p_s = torch.log_softmax(_scaled(student_logits.reshape(n, vocab), temperature), dim=-1)  # (N, V)
        log_p_t = teacher_log_probs.reshape(n, vocab).to(log_p_s.dtype)
        p_t = log_p_t.exp()
        # KL summed over positions: one dot product of p_t with (log p_t - log p_s). The difference is taken
        # per element first: sum p_t log p_t - sum p_t log p_s would subtract two sums of size N log V, and T^2
        # multiplies what that cancellation loses (1e-4 at T = 20 in fp32)
        diff = log_p_t - log_p_s
        total = torch.dot(p_t.view(-1), diff.view(-1))
        if not torch.isfinite(total):  # a target with log p = -inf: its 0 * -inf term is 0, not nan
            total = torch.where(p_t > 0, p_t * diff, torch.zeros_like(p_t)).sum()
        del diff
        loss = total * (temperature**2 / n)
        if ctx.needs_input_grad[0]:
            # d/ds [T^2 KL] = T^2 * (p_s - p_t) / T per position, over N positions; in place on log_p_s, and kept
            # in the logits' dtype (what autograd's cast would hand back anyway)
            grad = log_p_s.exp_().sub_(p_t).mul_(temperature / n).to(student_logits.dtype)
            ctx.save_for_backward(grad)
            ctx.shape = student_logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).reshape(ctx.shape), None, None


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T in fp32 (fp64 stays fp64), with one new tensor: a bf16 / fp16 copy is divided in place."""
    if z.dtype in (torch.float32, torch.float64):
        return z / temperature
    return z.float().div_(temperature)


def soft_target_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(p_target || softmax(s / T)); the target given as log-probabilities."""
    return _SoftTargetKL.apply(student_logits, teacher_log_probs.detach(), float(temperature))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss T^2 * mean_n KL(softmax(t / T) || softmax(s / T)), a scalar; logits (..., V)."""
    log_p_t = torch.log_softmax(_scaled(teacher_logits.detach(), temperature), dim=-1)
    return soft_target_loss(student_logits, log_p_t, temperature)


def mixture_log_probs(teacher_logits: torch.Tensor, temperature: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """log sum_k w_k softmax(t_k / T), computed in log space: teacher_logits (K, ..., V) -> (..., V)."""
    t = _scaled(teacher_logits.detach(), temperature)  # (K, ..., V) / T
    k = t.shape[0]
    log_w = (torch.full((k,), -math.log(k), dtype=t.dtype, device=t.device)
             if weights is None else weights.to(device=t.device, dtype=t.dtype).log())
    log_w = log_w.reshape(k, *([1] * (t.dim() - 1)))  # (K, 1, ..., 1): broadcast over positions and ids
    return torch.logsumexp(torch.log_softmax(t, dim=-1).add_(log_w), dim=0)


def multi_teacher_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean_n KL(sum_k w_k softmax(t_k / T) || softmax(s / T)), a scalar.

    ``teacher_logits``: (K, ..., V); ``weights``: (K,) summing to 1, or None for 1/K each."""
    return soft_target_loss(student_logits, mixture_log_probs(teacher_logits, temperature, weights), temperature)


def feature_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between the projection ``F.linear(h_s, W, b)`` (..., Ct) and ``teacher_hidden``."""
    return F.mse_loss(F.linear(student_hidden, weight, bias), teacher_hidden)
