"""DPO, batched: one forward over every chosen and rejected sequence, reference log-probs cached.

Direct Preference Optimization (Rafailov et al., 2023) trains the policy pi_theta on pairs (x, y_w, y_l),
y_w preferred, against a frozen reference pi_ref (the SFT model). With the log ratios
``h_w = log pi_theta(y_w|x) - log pi_ref(y_w|x)`` and ``h_l`` likewise (log-probs summed over the
completion tokens) and ``delta = h_w - h_l``:

- sigmoid (the paper's eq. 7): ``-log sigmoid(beta * delta)``; with label smoothing eps (conservative
  DPO, the label flipped with probability eps):
  ``(1 - eps) * -log sigmoid(beta delta) + eps * -log sigmoid(-beta delta)``;
- ipo (Azar et al., 2023, eq. 17): ``(delta' - 1 / (2 beta))^2`` where ``delta'`` uses each completion's
  log ratio averaged over its tokens (TRL's choice, agreed with the IPO authors; without token counts
  the sum is used, the paper's sequence-level form);
- implicit rewards ``beta * h_w`` and ``beta * h_l`` (detached: they are metrics).

The loss is the mean over pairs. At the start policy == reference, so delta = 0 and the sigmoid loss is ln 2.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from impl.dpo.data import tokenize_pair
from impl.gpt.model import GPT
from impl.sft.fast import pad_id as tokenizer_pad_id
from impl.train.loop import TrainConfig, make_optimizer

LOSS_TYPES = ("sigmoid", "ipo")
TokenPair = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt ids, chosen ids, rejected ids)


@dataclass
class PairBatch:
    """B pairs as 2B right-padded rows: rows 0..B-1 prompt + chosen, rows B..2B-1 prompt + rejected."""

    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens, 0 on padding
    completion_mask: torch.Tensor  # (2B, T) 1 on the completion's tokens (scored), 0 on prompt and padding

    @property
    def completion_tokens(self) -> torch.Tensor:
        """Completion length of each row (2B,)."""
        return self.completion_mask.sum(dim=1)


def collate(pairs: Sequence[TokenPair], pad_id: int = 0, device: torch.device | str = "cpu") -> PairBatch:
    """Right-pad the chosen sequences, then the rejected ones, into one ``PairBatch``."""
    if not pairs:
        raise ValueError("no pairs to collate")
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    completion = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.as_tensor([*prompt, *answer], dtype=torch.long)
        attention[i, :n] = 1
        completion[i, len(prompt):n] = 1
    return PairBatch(ids.to(device), attention.to(device), completion.to(device))


def sequence_logps(model: GPT, batch: PairBatch) -> torch.Tensor:
    """Summed log-probs of each row's completion tokens (2B,): one forward over the whole batch."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)  # (2B, T, V)
    # the logit at position t predicts token t + 1: drop the last logit and the first target
    token_logps = -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch.input_ids[:, 1:],
                                   reduction="none")  # (2B, T - 1)
    token_logps = token_logps.to(logits.dtype)
    # padding and prompt tokens are masked out here: only the completion is scored
    return (token_logps * batch.completion_mask[:, 1:]).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, chosen_rewards, rejected_rewards)`` from summed completion log-probs, each (B,): the mean
    loss over pairs (module docstring) and the detached implicit rewards (B,). ``chosen_tokens`` /
    ``rejected_tokens`` (B,) are the completion lengths IPO averages over (None: sums)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # the reference is a constant: no gradient may reach it (or the model it came from)
    chosen_logratios = policy_chosen - ref_chosen.detach()  # (B,)
    rejected_logratios = policy_rejected - ref_rejected.detach()
    if loss_type == "sigmoid":
        logits = beta * (chosen_logratios - rejected_logratios)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        if chosen_tokens is not None:
            chosen_logratios = chosen_logratios / chosen_tokens.clamp(min=1)
        if rejected_tokens is not None:
            rejected_logratios = rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def loss_with_grads(loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``loss_fn``'s loss and rewards plus the gradient of the loss with respect to each of the four
    log-prob inputs (zeros where none flows): the outputs a check compares with TRL's."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (policy_chosen, policy_rejected, ref_chosen,
                                                                  ref_rejected)]
    loss, chosen_rewards, rejected_rewards = loss_fn(*inputs, beta=beta, loss_type=loss_type,
                                                     label_smoothing=label_smoothing, chosen_tokens=chosen_tokens,
                                                     rejected_tokens=rejected_tokens)
    loss.backward()
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    grads = {f"grad_{n}": t.grad if t.grad is not None else torch.zeros_like(t)
             for n, t in zip(names, inputs, strict=True)}
    return {"loss": loss.detach(), "chosen_rewards": chosen_rewards.detach(),
            "rejected_rewards": rejected_rewards.detach(), **grads}


def dpo_loss_with_grads(**kwargs: Any) -> dict[str, torch.Tensor]:
    """``loss_with_grads(dpo_loss, ...)``: this module's loss, rewards and input gradients."""
    return loss_with_grads(dpo_loss, **kwargs)


class ReferenceCache:
    """Reference log-probs computed once per pair (under no_grad, in batches) and reused every epoch.

    ``pairs_computed`` counts the pairs the reference model has been run on."""

    def __init__(self, reference: GPT, pad_id: int = 0, batch_size: int = 16):
        self.reference = reference
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.pairs_computed = 0
        self._logps: dict[tuple[tuple[int, ...], ...], tuple[float, float]] = {}

    @staticmethod
    def key(pair: TokenPair) -> tuple[tuple[int, ...], ...]:
        """What identifies a pair: its three token sequences."""
        return tuple(tuple(int(t) for t in part) for part in pair)

    def logps(self, pairs: Sequence[TokenPair], dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``(ref_chosen, ref_rejected)`` (B,) for ``pairs``, running the reference only on pairs not seen before."""
        missing = list(dict.fromkeys(k for k in map(self.key, pairs) if k not in self._logps))
        device_of_ref = next(self.reference.parameters()).device
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            with torch.no_grad():
                logps = sequence_logps(self.reference, collate(chunk, self.pad_id, device_of_ref))  # (2b,)
            for i, key in enumerate(chunk):
                self._logps[key] = (logps[i].item(), logps[len(chunk) + i].item())
            self.pairs_computed += len(chunk)
        values = torch.tensor([self._logps[self.key(p)] for p in pairs], dtype=torch.float64)  # (B, 2)
        values = values.to(device=device, dtype=dtype)
        return values[:, 0], values[:, 1]


@dataclass
class DPOResult:
    """What ``train_dpo`` did: one history row per logged step (means over the steps since the last row)."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0
    reference_pairs_computed: int = 0
    eval_accuracy_before: float | None = None  # the starting policy's likelihood ranking (reference=None)
    eval_accuracy_after: float | None = None  # the trained policy's implicit-reward ranking


def _step_stats(policy: GPT, cache: ReferenceCache, pairs: Sequence[TokenPair], beta: float, loss_type: str,
                label_smoothing: float, pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    device = next(policy.parameters()).device
    batch = collate(pairs, pad_id, device)
    logps = sequence_logps(policy, batch)  # (2B,): chosen rows, then rejected rows
    policy_chosen, policy_rejected = logps.chunk(2)
    ref_chosen, ref_rejected = cache.logps(pairs, logps.dtype, device)
    chosen_tokens, rejected_tokens = batch.completion_tokens.chunk(2)
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                      beta, loss_type, label_smoothing, chosen_tokens,
                                                      rejected_tokens)
    stats = {
        "loss": loss.item(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean().item(),
        "chosen_reward": chosen_rewards.mean().item(),
        "rejected_reward": rejected_rewards.mean().item(),
        # log pi_theta(y_w) - log pi_ref(y_w): how far the policy has moved on the chosen answers (an
        # off-policy stand-in for KL(pi_theta || pi_ref), which would need samples from the policy)
        "kl_chosen": (policy_chosen - ref_chosen).mean().item(),
    }
    return loss, stats


def train_dpo(policy: GPT, reference: GPT, tokenizer: Any, records: Sequence[dict[str, Any]], beta: float = 0.1,
              steps: int = 100, lr: float = 1e-4, batch_size: int = 8,
              eval_records: Sequence[dict[str, Any]] | None = None, log_every: int = 10,
              loss_type: str = "sigmoid", label_smoothing: float = 0.0, seed: int = 0, grad_clip: float = 1.0,
              progress: bool = True) -> DPOResult:
    """Train ``policy`` in place with DPO against the frozen ``reference`` on preference ``records``
    (shuffled each epoch with ``seed``), AdamW at a constant ``lr`` (``impl.train.loop.make_optimizer``,
    no weight decay), gradients clipped to ``grad_clip``. Every ``log_every`` steps (and at the last) a
    history row: step, loss, reward accuracy, reward margin, chosen / rejected reward, kl_chosen, and the
    preference accuracy on ``eval_records`` when given."""
    if not records:
        raise ValueError("no preference records to train on")
    pairs = [tokenize_pair(tokenizer, r) for r in records]
    pad_id = tokenizer_pad_id(tokenizer)
    cache = ReferenceCache(reference.eval(), pad_id, batch_size)
    reference.requires_grad_(False)
    optimizer = make_optimizer(policy, TrainConfig(learning_rate=lr, weight_decay=0.0))
    result = DPOResult()
    eval_cache = ReferenceCache(reference, pad_id, batch_size) if eval_records else None
    if eval_records:  # before training the implicit reward is 0 for every pair: rank by likelihood instead
        result.eval_accuracy_before = preference_accuracy(policy, None, tokenizer, eval_records, beta, batch_size)
    rng = random.Random(seed)
    order: list[int] = []
    window: list[dict[str, float]] = []
    t0 = time.perf_counter()
    policy.train()
    for step in tqdm(range(1, steps + 1), desc="dpo", disable=not progress):
        if len(order) < batch_size:  # a new epoch: every pair once before any twice
            fresh = list(range(len(pairs)))
            rng.shuffle(fresh)
            order += fresh
        chosen_idx, order = order[:batch_size], order[batch_size:]
        loss, stats = _step_stats(policy, cache, [pairs[i] for i in chosen_idx], beta, loss_type,
                                  label_smoothing, pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
        optimizer.step()
        window.append(stats)
        if step % log_every == 0 or step == steps:
            row = {"step": step, **{k: sum(s[k] for s in window) / len(window) for k in window[0]}}
            if eval_records:
                row["eval_accuracy"] = preference_accuracy(policy, reference, tokenizer, eval_records, beta,
                                                           batch_size, eval_cache)
                row["eval_likelihood_accuracy"] = preference_accuracy(policy, None, tokenizer, eval_records,
                                                                      beta, batch_size)
            result.history.append(row)
            window = []
    policy.eval()
    result.steps = steps
    result.wall_s = time.perf_counter() - t0
    result.reference_pairs_computed = cache.pairs_computed
    if eval_records:
        result.eval_accuracy_after = result.history[-1]["eval_accuracy"]
    return result


@torch.no_grad()
def preference_accuracy(policy: GPT, reference: GPT | None, tokenizer: Any, records: Sequence[dict[str, Any]],
                        beta: float = 0.1, batch_size: int = 16, cache: ReferenceCache | None = None) -> float:
    """Share of ``records`` the policy ranks chosen above rejected (a tie counts as wrong). With a
    ``reference``: by implicit reward, ``beta * (h_w - h_l) > 0`` (module docstring), which is 0 for a
    policy equal to its reference; with ``reference=None``: by likelihood, ``log pi(y_w|x) > log pi(y_l|x)``,
    the ranking a model has before DPO (e.g. the SFT model's)."""
    if not records:
        raise ValueError("no preference records to evaluate")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pad_id = tokenizer_pad_id(tokenizer)
    if reference is not None and cache is None:
        cache = ReferenceCache(reference.eval(), pad_id, batch_size)
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    pairs = [tokenize_pair(tokenizer, r) for r in records]
    wins = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        logps = sequence_logps(policy, collate(chunk, pad_id, device))
        policy_chosen, policy_rejected = logps.chunk(2)
        margin = policy_chosen - policy_rejected
        if cache is not None:
            ref_chosen, ref_rejected = cache.logps(chunk, logps.dtype, device)
            margin = beta * (margin - (ref_chosen - ref_rejected))
        wins += int((margin > 0).sum())
    policy.train(was_training)
    return wins / len(pairs)


def dpo_batch_loss(config: dict[str, Any], state: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor],
                   prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                   rejected: Sequence[Sequence[int]], beta: float, loss_type: str = "sigmoid",
                   ) -> dict[str, torch.Tensor]:
    """The check's entry point: policy (``state``) and reference (``ref_state``) GPTs of shape ``config``
    scored on the pairs in one batched forward each; returns loss, rewards (B,), the policy's summed
    completion log-probs (B,) and the loss's gradient on the token embedding (V, C)."""
    policy = GPT.from_state(config, state)
    cache = ReferenceCache(GPT.from_state(config, ref_state))
    pairs = list(zip(prompts, chosen, rejected, strict=True))
    batch = collate(pairs)
    policy_chosen, policy_rejected = sequence_logps(policy, batch).chunk(2)  # (B,) each
    ref_chosen, ref_rejected = cache.logps(pairs, policy_chosen.dtype)
    chosen_tokens, rejected_tokens = batch.completion_tokens.chunk(2)
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                      beta, loss_type, 0.0, chosen_tokens, rejected_tokens)
    loss.backward()
    return {"loss": loss.detach(), "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "policy_chosen": policy_chosen.detach(), "policy_rejected": policy_rejected.detach(),
            "grad_embedding": policy.wte.weight.grad}
