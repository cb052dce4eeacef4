"""Unit tests of project 21: FFN names and the seam, capacity and dropping, top-k gates, the auxiliary loss
reaching the training step, save / load, FLOPs vs experts, and the real torchrun CLI on 2 CPU ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import impl.moe
from impl.gpt.model import GPT, GPTConfig, get_ffn, lm_loss
from impl.moe import fast, naive
from impl.moe.layer import MoE, MoESettings, parse
from impl.moe.router import capacity, load_balancing_loss, route, slot_positions
from impl.train.loop import TrainConfig, make_optimizer, train_step
from tests.cases.moe import layer_case

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


def tiny_moe(ffn: str = "moe:e4:k2:c1.25", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY, ffn=ffn))


def test_ffn_names_round_trip_and_bad_names_are_refused_with_the_field():
    s = parse("moe:e16:k2:c1.25")
    assert (s.n_experts, s.top_k, s.capacity_factor, s.renormalized) == (16, 2, 1.25, True)
    assert parse("moe:e8:k1").renormalized is False  # Switch top-1: the raw probability
    full = MoESettings(8, 2, None, hidden=48, alpha=0.1, noise_std=0.5, renormalize=False, aux_choices="all")
    assert parse(full.name()) == full
    with pytest.raises(ValueError, match="'z9'"):
        parse("moe:e4:z9")
    with pytest.raises(ValueError, match="expert count"):
        parse("moe:k2")
    with pytest.raises(ValueError, match="unknown ffn"):
        get_ffn("moe:e4:k9")  # top_k > experts: not resolvable
    assert impl.moe.register(6, 3, 2.0) == "moe:e6:k3:c2"


def test_capacity_is_the_ceiling_of_factor_times_tokens_times_k_over_experts():
    assert capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
    assert capacity(16, 8, 2, 1.0) == 4
    assert capacity(7, 3, 2, None) == 7
    with pytest.raises(ValueError):
        capacity(8, 2, 1, 0.0)


def test_queues_take_every_first_choice_before_any_second_choice():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # expert 0's queue: t0, t2 (first choices), then t1
    assert slot_positions(experts, 2).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_tokens_over_capacity_get_zero_output_and_the_earlier_ones_keep_theirs():
    case = layer_case(0, 8, 2, 1, 0.5, renormalize=False)
    case["router_weight"] = torch.stack([case["x"].sum(0), -case["x"].sum(0)]) * 0  # all logits equal
    case["router_weight"][0, 0] = 1e-6
    x = case["x"].clone()
    x[:, 0] = x[:, 0].abs() + 1  # expert 0 is everyone's choice
    args = (x, case["router_weight"], case["w_fc"], case["b_fc"], case["w_proj"], case["b_proj"], 1, 0.5, False)
    y, routing, kept = fast.moe_ffn(*args)
    assert (routing.experts == 0).all() and capacity(8, 2, 1, 0.5) == 2
    assert kept.view(-1).tolist() == [True, True] + [False] * 6
    assert (y[2:] == 0).all() and (y[:2] != 0).all()
    assert torch.allclose(y, naive.moe_ffn(*args)[0])


def test_top_k_gates_are_renormalized_over_the_chosen_experts_only_when_asked():
    x, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    renorm, raw = route(x, w, 2, renormalize=True), route(x, w, 2, renormalize=False)
    assert torch.allclose(renorm.gates.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(raw.gates, raw.probs.gather(1, raw.experts)) and (raw.gates.sum(-1) < 1).all()
    assert (renorm.experts == raw.experts).all()


def test_router_noise_changes_routing_in_training_only():
    x, w = torch.randn(200, 8), torch.randn(4, 8) * 0.1
    quiet = route(x, w, 1, noise_std=1.0, training=False).experts
    assert torch.equal(quiet, route(x, w, 1).experts)
    assert not torch.equal(quiet, route(x, w, 1, noise_std=1.0, training=True).experts)


def test_a_balanced_router_scores_alpha_and_a_collapsed_one_scores_alpha_times_n():
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    assert torch.isclose(load_balancing_loss(uniform, torch.arange(n).remainder(e).unsqueeze(1), 0.01),
                         torch.tensor(0.01))
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1
    assert torch.isclose(load_balancing_loss(collapsed, torch.zeros(n, 1, dtype=torch.long), 0.01),
                         torch.tensor(0.04))


def test_the_gpt_runs_moe_ffns_and_its_aux_loss_sums_every_layers():
    model = tiny_moe()
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64)
    layers = [b.mlp for b in model.blocks]
    assert all(isinstance(m, MoE) for m in layers)
    assert torch.isclose(model.aux_loss(), sum(m.aux_loss for m in layers))
    assert all(int(m.last_load.sum()) <= 2 * 16 * 2 for m in layers)


def test_the_training_step_adds_the_load_balancing_loss_and_it_trains_the_router():
    model = tiny_moe("moe:e4:k1:c1.25")
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        expected = lm_loss(model(x), y) + model.aux_loss()
    cfg = TrainConfig(learning_rate=0.0)
    loss = train_step(model, make_optimizer(model, cfg), [(x, y)])
    assert torch.isclose(loss, expected.float(), atol=1e-6)
    # the aux loss alone gives the router a gradient (top-1 raw gates: the LM loss does too, so compare both)
    model.zero_grad()
    lm_loss(model(x), y).backward()
    lm_only = model.blocks[0].mlp.router.weight.grad.clone()
    model.zero_grad()
    (lm_loss(model(x), y) + model.aux_loss()).backward()
    assert not torch.allclose(model.blocks[0].mlp.router.weight.grad, lm_only)


def test_a_saved_moe_gpt_loads_from_its_config_alone():
    model = tiny_moe("moe:e4:k2:c2:h24").eval()
    config, state = model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    import impl.gpt.model as gm

    gm._FFNS.pop(config["ffn"], None)  # as in a fresh process: nothing registered under that name yet
    loaded = GPT.from_state(config, state)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx), model(idx))
    assert loaded.blocks[0].mlp.w_fc.shape == (4, 32, 24)


def test_more_experts_add_parameters_but_not_forward_flops():
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.randint(0, 64, (4, 16))
    flops, params = {}, {}
    for e in (2, 8):
        model = tiny_moe(f"moe:e{e}:k1:c1").eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(idx)
        flops[e], params[e] = counter.get_total_flops(), model.num_params()
    assert flops[8] <= 1.05 * flops[2] and params[8] > 2 * params[2]


def _gpt_batches() -> torch.Tensor:
    return torch.randint(0, 64, (2, 3, 16), generator=torch.Generator().manual_seed(5))  # (rank, B, T)


def _sharded_gpt_rank(rank: int, world: int) -> dict:
    from impl.moe import expert_parallel

    model = tiny_moe("moe:e4:k2:c1").double()
    replicated = expert_parallel.shard(model, rank, world)
    idx = _gpt_batches()[rank]
    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:]) + model.aux_loss()
    loss.backward()
    expert_parallel.reduce_replicated(replicated)
    return {"loss": loss.item(), "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.timeout(120)
def test_an_expert_parallel_gpt_on_two_ranks_has_the_single_process_losses_and_gradients():
    from impl.distributed import spawn

    ranks = spawn(_sharded_gpt_rank, 2)
    model = tiny_moe("moe:e4:k2:c1").double()
    batches = _gpt_batches()
    losses = []
    for r in range(2):
        loss = lm_loss(model(batches[r][:, :-1]), batches[r][:, 1:]) + model.aux_loss()
        loss.backward()
        losses.append(loss.item())
    assert [r["loss"] for r in ranks] == pytest.approx(losses, rel=1e-12)
    for name, p in model.named_parameters():
        if name.split(".")[-1] in ("w_fc", "b_fc", "w_proj", "b_proj"):  # each rank holds half the experts
            got = torch.cat([ranks[0]["grads"][name], ranks[1]["grads"][name]])
        else:  # replicated: summed over the ranks, the same on both
            got = ranks[0]["grads"][name]
            assert torch.equal(got, ranks[1]["grads"][name]), name
        assert torch.allclose(got, p.grad, rtol=1e-9, atol=1e-12), name


@pytest.mark.timeout(120)
def test_torchrun_trains_expert_parallel_steps_on_two_cpu_ranks():
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "impl.moe",
           "--data", "random", "--experts", "4", "--top-k", "2", "--steps", "3", "--n-embd", "32",
           "--block-size", "16"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    # two processes share the pipe: lines may interleave, so search the whole text
    for rank, experts in ((0, "0-1"), (1, "2-3")):
        steps = re.findall(rf"rank {rank}/2 step (\d): loss [\d.]+ aux [\d.]+ experts {experts} ran", out.stdout)
        assert steps == ["0", "1", "2"], out.stdout
    assert "summary: 2 rank(s), moe:e4:k2:c1.25, 3 steps" in out.stdout, out.stdout


def test_cli_help_names_torchrun():
    out = subprocess.run([sys.executable, "-m", "impl.moe", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "torchrun" in out.stdout
