"""Cases and properties for project 18: logits to distil (temperatures, sharp and flat distributions,
identical student and teacher, low precision), stacked teachers, hidden states to project; properties
against torch's ``kl_div``, the closed-form gradient and the temperature limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from harness.cases import Cases


def logits_case(seed: int, shape: tuple[int, ...], temperature: float, scale: float = 1.0, same: bool = False,
                dtype: torch.dtype = torch.float32, id: str | None = None) -> dict[str, Any]:
    """Student and teacher logits of ``shape`` (..., V), normal times ``scale`` (a large scale: peaked
    distributions); ``same``: the student equals the teacher (the loss is 0)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    student = teacher.clone() if same else torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    case = {"student_logits": student.float(), "teacher_logits": teacher.float(), "temperature": temperature,
            "dtype": dtype}
    return case | ({"id": id} if id else {})


logits = Cases(
    edge=[
        logits_case(0, (2, 5, 11), 1.0, id="T1"),
        logits_case(1, (2, 5, 11), 2.0, id="T2"),
        logits_case(2, (3, 7, 64), 4.0, id="T4-vocab64"),
        logits_case(3, (4, 13), 0.5, id="T0.5-flat-positions"),
        logits_case(4, (1, 1, 2), 3.0, id="one-position-two-ids"),
        logits_case(5, (2, 3, 32), 2.0, scale=30.0, id="peaked-logits"),
        logits_case(6, (2, 4, 16), 2.0, same=True, id="student-equals-teacher"),
        logits_case(7, (2, 6, 257), 8.0, scale=5.0, id="T8-odd-vocab"),
        logits_case(8, (2, 4, 48), 2.0, dtype=torch.bfloat16, id="bf16-logits"),
    ],
    strategy=st.builds(logits_case, seed=st.integers(0, 2**16),
                       shape=st.sampled_from([(1, 3), (5, 2), (2, 3, 7), (3, 4, 50), (1, 9, 129)]),
                       temperature=st.sampled_from([0.25, 1.0, 1.5, 2.0, 5.0, 20.0]),
                       scale=st.sampled_from([0.1, 1.0, 4.0, 20.0]), same=st.booleans()),
)


def _torch_kd(s: torch.Tensor, log_target: torch.Tensor, temperature: float, log_target_given: bool = True
              ) -> torch.Tensor:
    """torch's ``kl_div`` (reduction batchmean over flattened positions) times T^2: the oracle."""
    vocab = s.shape[-1]
    log_p_s = F.log_softmax(s.reshape(-1, vocab) / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p_s, log_target.reshape(-1, vocab), reduction="batchmean",
                                     log_target=log_target_given)


def matches_torch_kl_div(fn: Callable, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> None:
    """Property: ``fn`` equals T^2 * torch.nn.functional.kl_div(log_softmax(s / T), log_softmax(t / T),
    log_target=True, reduction="batchmean") over the flattened positions (float64 in, 1e-9 relative)."""
    s, t = student_logits.double(), teacher_logits.double()
    ours = fn(s, t, temperature)
    log_p_t = F.log_softmax(t.reshape(-1, t.shape[-1]) / temperature, dim=-1)
    ref = _torch_kd(s, log_p_t, temperature)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12), (
        f"got {ours.item():.12g}, torch's kl_div x T^2 {ref.item():.12g}")


def gradient_is_temperature_times_probability_gap(fn: Callable, student_logits: torch.Tensor,
                                                  teacher_logits: torch.Tensor, temperature: float) -> None:
    """Property: d(c * loss)/ds = c * T * (softmax(s / T) - softmax(t / T)) / N for an upstream factor c
    (Hinton et al., eq. 2, times T^2); no gradient reaches the teacher."""
    s = student_logits.double().requires_grad_(True)
    t = teacher_logits.double().requires_grad_(True)
    (fn(s, t, temperature) * 3.0).backward()
    n = s.numel() // s.shape[-1]
    expected = 3.0 * temperature * (torch.softmax(s.detach() / temperature, -1)
                                    - torch.softmax(t.detach() / temperature, -1)) / n
    assert s.grad is not None, "no gradient reached the student logits"
    err = (s.grad - expected).abs().max().item()
    assert err <= 1e-9 * max(1.0, expected.abs().max().item()), f"gradient off by up to {err:.3g}"
    assert t.grad is None or not t.grad.any(), "a gradient reached the teacher's logits (they are a constant target)"


def temperature_limits(fn: Callable, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> None:
    """Property (the case's temperature is replaced by the two limits), in float64:

    - T -> large: T^2 * KL -> (1 / 2V) * sum_v (t~_v - s~_v)^2 per position, t~ and s~ the logits minus their
      mean: matching logits (Hinton et al., section 2.1); checked at T = 1e4 * max|logit| to 1e-3 relative;
    - T -> 0: T^2 * KL / T -> max_v s_v - s[argmax t], the student's logit gap from its own top id to the
      teacher's (0 where the two agree); checked at T = (smallest top-2 gap of either side) / 50."""
    s, t = student_logits.double(), teacher_logits.double()
    vocab = s.shape[-1]
    s2, t2 = s.reshape(-1, vocab), t.reshape(-1, vocab)
    big = 1e4 * max(1.0, s.abs().max().item(), t.abs().max().item())
    diff = (t2 - t2.mean(-1, keepdim=True)) - (s2 - s2.mean(-1, keepdim=True))
    logit_matching = (diff**2).sum(-1).mean() / (2 * vocab)
    got = fn(s, t, big)
    assert torch.allclose(got, logit_matching, rtol=1e-3, atol=1e-9), (
        f"T={big:.3g}: got {got.item():.6g}, the logit-matching limit is {logit_matching.item():.6g}")
    gaps = torch.cat([x.topk(2, dim=-1).values.diff(dim=-1).abs().flatten() for x in (s2, t2)])
    if vocab < 2 or gaps.min().item() == 0.0:
        return  # a tie at the top: the T -> 0 limit depends on how the tie splits
    small = gaps.min().item() / 50
    margin = (s2.max(-1).values - s2.gather(-1, t2.argmax(-1, keepdim=True)).squeeze(-1)).mean()
    got = fn(s, t, small) / small
    assert torch.allclose(got, margin, rtol=1e-6, atol=1e-9), (
        f"T={small:.3g}: T*KL is {got.item():.6g}, the student's margin to the teacher's top id {margin.item():.6g}")


def teachers_case(seed: int, k: int, shape: tuple[int, ...], temperature: float, weighted: bool,
                  scale: float = 1.0, dtype: torch.dtype = torch.float32, id: str | None = None) -> dict[str, Any]:
    """Student logits (..., V), ``k`` teachers' logits stacked (k, ..., V), and weights (k,) or None."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen) * scale
    teachers = torch.randn((k, *shape), generator=gen) * scale
    weights = torch.rand(k, generator=gen) + 0.1 if weighted else None
    case = {"student_logits": student, "teacher_logits": teachers, "temperature": temperature,
            "weights": None if weights is None else weights / weights.sum(), "dtype": dtype}
    return case | ({"id": id} if id else {})


teachers = Cases(
    edge=[
        teachers_case(0, 2, (2, 5, 11), 2.0, False, id="two-teachers-equal-weights"),
        teachers_case(1, 3, (3, 4, 32), 1.0, True, id="three-teachers-weighted"),
        teachers_case(2, 1, (2, 3, 16), 2.0, False, id="one-teacher"),
        teachers_case(3, 2, (2, 6, 64), 0.5, True, scale=10.0, id="peaked-low-T"),
        teachers_case(4, 2, (2, 4, 48), 4.0, False, dtype=torch.bfloat16, id="bf16"),
    ],
    strategy=st.builds(teachers_case, seed=st.integers(0, 2**16), k=st.integers(1, 4),
                       shape=st.sampled_from([(1, 3), (4, 2), (2, 3, 9), (2, 5, 40)]),
                       temperature=st.sampled_from([0.5, 1.0, 2.0, 6.0]), weighted=st.booleans(),
                       scale=st.sampled_from([0.5, 1.0, 8.0])),
)


def matches_torch_kl_div_against_the_mixture(fn: Callable, student_logits: torch.Tensor,
                                             teacher_logits: torch.Tensor, temperature: float,
                                             weights: torch.Tensor | None) -> None:
    """Property: ``fn`` equals T^2 * torch's ``kl_div`` (batchmean) of the student's softened log-probabilities
    against sum_k w_k * softmax(t_k / T) (probabilities averaged, not logits; w = 1/K when None)."""
    s, t = student_logits.double(), teacher_logits.double()
    w = torch.full((t.shape[0],), 1.0 / t.shape[0], dtype=torch.float64) if weights is None else weights.double()
    mixture = (w.reshape(-1, *([1] * (t.dim() - 1))) * torch.softmax(t / temperature, dim=-1)).sum(0)
    ours = fn(s, t, temperature, None if weights is None else w)
    ref = _torch_kd(s, mixture.reshape(-1, s.shape[-1]), temperature, log_target_given=False)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12), f"got {ours.item():.12g}, torch's {ref.item():.12g}"


def features_case(seed: int, shape: tuple[int, ...], student_width: int, teacher_width: int, bias: bool,
                  dtype: torch.dtype = torch.float32, id: str | None = None) -> dict[str, Any]:
    """Student hidden states (..., Cs), teacher's (..., Ct) and a projection (Ct, Cs) with or without bias."""
    gen = torch.Generator().manual_seed(seed)
    case = {"student_hidden": torch.randn((*shape, student_width), generator=gen),
            "teacher_hidden": torch.randn((*shape, teacher_width), generator=gen) * 2,
            "weight": torch.randn(teacher_width, student_width, generator=gen) / student_width**0.5,
            "bias": torch.randn(teacher_width, generator=gen) if bias else None, "dtype": dtype}
    return case | ({"id": id} if id else {})


features = Cases(
    edge=[
        features_case(0, (2, 5), 8, 16, True, id="widen-8-to-16"),
        features_case(1, (3, 4), 32, 32, False, id="same-width-no-bias"),
        features_case(2, (1, 1), 4, 12, True, id="one-position"),
        features_case(3, (2, 7), 16, 24, True, dtype=torch.bfloat16, id="bf16"),
    ],
    strategy=st.builds(features_case, seed=st.integers(0, 2**16), shape=st.sampled_from([(1, 2), (2, 3), (4, 5)]),
                       student_width=st.sampled_from([2, 8, 16]), teacher_width=st.sampled_from([4, 8, 32]),
                       bias=st.booleans()),
)
