"""Unit tests of project 18: the Distiller on the shared loop's aux_loss seam, its objective and its teachers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from impl.distillation import fast, naive
from impl.distillation.train import (
    Distiller,
    distill,
    distill_config,
    distill_on_tasks,
    layer_map,
    student_like,
)
from impl.gpt.model import GPT, GPTConfig, lm_loss
from impl.train.loop import TrainConfig, train

VOCAB = 32
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.uint16)
STUDENT = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16).to_dict()


def teacher(seed: int = 1, n_layer: int = 3) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=n_layer, n_head=2, n_embd=32)).float().eval()


def tiny_cfg(steps: int = 6, clip: float = 1.0) -> TrainConfig:
    return TrainConfig(max_iters=steps, lr_decay_iters=steps, warmup_iters=1, batch_size=4, block_size=16,
                       eval_interval=10**6, eval_iters=1, learning_rate=3e-3, grad_clip=clip)


def test_layer_map_matches_student_blocks_to_evenly_spaced_teacher_blocks_ending_at_the_last():
    assert layer_map(2, 6) == [(1, 3), (2, 6)]
    assert layer_map(1, 3) == [(1, 3)]
    assert layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]


def test_evaluation_forward_is_the_student_alone_and_sets_no_distillation_term():
    student = student_like(STUDENT, 0)
    model = Distiller(student, [teacher()], alpha=0.5, beta=1.0)
    x = torch.from_numpy(TOKENS[:32].astype(np.int64)).view(2, 16)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, student(x))
    assert model.aux_loss() is None


def test_training_forward_sets_the_kd_term_scaled_by_alpha_over_one_minus_alpha():
    student, t = student_like(STUDENT, 0), teacher()
    model = Distiller(student, [t], temperature=3.0, alpha=0.25)
    x = torch.from_numpy(TOKENS[:32].astype(np.int64)).view(2, 16)
    logits = model(x)
    expected = (0.25 / 0.75) * naive.kd_loss(logits.detach(), t(x).detach(), 3.0)
    assert torch.allclose(model.aux_loss(), expected, rtol=1e-5, atol=1e-6)


def test_the_loop_gradient_on_the_distiller_is_the_weighted_objectives_times_one_over_one_minus_alpha():
    """LM + a/(1-a) KD clipped at c/(1-a) (what the loop runs) gives 1/(1-a) times the gradient of
    (1-a) LM + a KD clipped at c: the same AdamW step (Adam divides the constant factor out)."""
    alpha, clip = 0.6, 0.05  # a tight clip: it must act, and act alike on both
    t = teacher()
    x = torch.from_numpy(TOKENS[:64].astype(np.int64)).view(4, 16)
    y = torch.from_numpy(TOKENS[1:65].astype(np.int64)).view(4, 16)
    by_hand = student_like(STUDENT, 0)
    logits = by_hand(x)
    ((1 - alpha) * lm_loss(logits, y) + alpha * fast.kd_loss(logits, t(x).detach(), 2.0)).backward()
    norm = torch.nn.utils.clip_grad_norm_(by_hand.parameters(), clip)
    assert norm > clip
    looped = student_like(STUDENT, 0)
    model = Distiller(looped, [t], 2.0, alpha)
    (lm_loss(model(x), y) + model.aux_loss()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), distill_config(tiny_cfg(clip=clip), alpha).grad_clip)
    for (name, a), b in zip(by_hand.named_parameters(), looped.parameters(), strict=True):
        assert torch.allclose(a.grad / (1 - alpha), b.grad, rtol=1e-4, atol=1e-9), name


def test_alpha_zero_without_features_is_the_scratch_run_bit_for_bit():
    """Same initial weights, same batches, same loop: the Distiller adds nothing when its terms are off."""
    scratch, distilled = student_like(STUDENT, 0), student_like(STUDENT, 0)
    train(scratch, TOKENS, TOKENS, tiny_cfg(), progress=False)
    distill(distilled, [teacher()], TOKENS, TOKENS, tiny_cfg(), alpha=0.0)
    for key, value in scratch.state_dict().items():
        assert torch.equal(value, distilled.state_dict()[key]), key


def test_distillation_trains_the_student_only_and_moves_it_toward_the_teacher():
    """After the same steps on the same batches, the distilled student's distributions are closer to the
    teacher's than the scratch student's (and closer than at the start); the teacher is unchanged."""
    t = teacher()
    with torch.no_grad():
        t.wte.weight.mul_(30)  # a random GPT's logits are near 0: sharpen the teacher so there is a gap to close
    t_before = copy.deepcopy(t.state_dict())
    x = torch.from_numpy(TOKENS[:256].astype(np.int64)).view(16, 16)
    scratch, distilled = student_like(STUDENT, 0), student_like(STUDENT, 0)
    with torch.no_grad():
        gap_before = fast.kd_loss(scratch(x), t(x), 2.0).item()
    train(scratch, TOKENS, TOKENS, tiny_cfg(40), progress=False)
    distill(distilled, [t], TOKENS, TOKENS, tiny_cfg(40), temperature=2.0, alpha=0.9)
    with torch.no_grad():
        gap_scratch = fast.kd_loss(scratch(x), t(x), 2.0).item()
        gap_distilled = fast.kd_loss(distilled(x), t(x), 2.0).item()
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in t_before.items())
    assert gap_distilled < gap_before and gap_distilled < 0.9 * gap_scratch, (gap_before, gap_scratch, gap_distilled)


def test_naive_and_fast_losses_train_to_the_same_weights():
    """The fused closed-form gradient is autograd's gradient of the written-out loss: a few distillation
    steps with each give the same student (to float32 rounding)."""
    out = {}
    for impl in ("naive", "fast"):
        student = student_like(STUDENT, 0)
        model = Distiller(student, [teacher(1), teacher(2)], 2.0, 0.5, impl=impl)
        train(model, TOKENS, TOKENS, distill_config(tiny_cfg(), 0.5), progress=False)
        out[impl] = student.state_dict()
    for key, value in out["naive"].items():
        err = (value - out["fast"][key]).abs().max().item()
        assert err <= 1e-5, f"{key}: the two students differ by up to {err:.3g}"


def test_feature_distillation_trains_the_projections_against_the_first_teachers_blocks():
    student = student_like(STUDENT | {"n_layer": 2}, 0)
    model = Distiller(student, [teacher(n_layer=4)], alpha=0.0, beta=1.0)
    assert model.pairs == [(1, 2), (2, 4)]
    before = [p.weight.detach().clone() for p in model.projections]
    train(model, TOKENS, TOKENS, tiny_cfg(), progress=False)
    assert all(not torch.equal(b, p.weight) for b, p in zip(before, model.projections, strict=True))


def test_a_teacher_with_another_vocabulary_and_alpha_one_are_refused():
    other = GPT(GPTConfig(vocab_size=VOCAB + 1, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="one vocabulary"):
        Distiller(student_like(STUDENT, 0), [other])
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\)"):
        Distiller(student_like(STUDENT, 0), [teacher()], alpha=1.0)


def test_the_fused_loss_keeps_bf16_logits_gradient_in_bf16_and_computes_in_fp32():
    s = torch.randn(2, 3, 40).bfloat16().requires_grad_(True)
    t = torch.randn(2, 3, 40).bfloat16()
    loss = fast.kd_loss(s, t, 2.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    assert torch.allclose(loss, naive.kd_loss(s.detach(), t, 2.0), rtol=1e-6)


def test_padding_is_left_out_of_the_soft_targets():
    """With an attention_mask (padded batch) or segment_ids (packed rows), the KD term is the mean over
    the real tokens only: what the student predicts at a padded position does not change it."""
    student, t = student_like(STUDENT, 0), teacher()
    model = Distiller(student, [t], temperature=2.0, alpha=0.5)
    x = torch.from_numpy(TOKENS[:32].astype(np.int64)).view(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding of row 1
    logits = model(x, attention_mask=mask)
    real = mask.bool()
    with torch.no_grad():
        t_logits = t(x, attention_mask=mask)
    expected = naive.kd_loss(logits.detach()[real], t_logits[real], 2.0)
    assert torch.allclose(model.aux_loss(), expected, rtol=1e-5, atol=1e-6)
    segments = torch.tensor([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4])
    logits = model(x, segment_ids=segments)
    with torch.no_grad():
        t_logits = t(x, segment_ids=segments)
    expected = naive.kd_loss(logits.detach()[segments > 0], t_logits[segments > 0], 2.0)
    assert torch.allclose(model.aux_loss(), expected, rtol=1e-5, atol=1e-6)


def test_task_specific_distillation_fine_tunes_the_student_on_instruction_examples():
    from impl.sft.fast import SFTConfig, shift

    examples = [shift([int(v) for v in TOKENS[i:i + 10]], [-100] * 5 + [int(v) for v in TOKENS[i + 5:i + 10]])
                for i in range(0, 200, 10)]
    student = student_like(STUDENT, 0)
    before = copy.deepcopy(student.state_dict())
    cfg = SFTConfig(epochs=1, batch_size=4, pack=16, dtype="fp32")
    result = distill_on_tasks(student, [teacher()], examples, cfg)
    assert result.steps == 5
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
