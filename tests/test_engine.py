"""The engine API (add / step / stream / abort), its errors, sampling, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from impl.engine.base import QueueFull
from impl.engine.continuous import Engine
from impl.engine.request import SamplingParams
from impl.engine.static import StaticEngine
from impl.gpt.model import GPT
from impl.kv_cache.fast import decode
from impl.prompt_caching.response_cache import ResponseCache
from tests.cases.gpt import random_gpt


@pytest.fixture(scope="module")
def model() -> GPT:
    config, state = random_gpt(0, 2, 2, 8, 61, block_size=64, peaked=True)
    return GPT.from_state(config, state)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]


@pytest.mark.parametrize("make", [lambda m: Engine(m, max_num_seqs=2, block_size=4),
                                  lambda m: StaticEngine(m, max_batch=2)], ids=["continuous", "static"])
def test_streamed_pieces_add_up_to_the_final_output(model, make):
    engine = make(model)
    ids = [engine.add_request(p, SamplingParams(max_tokens=5 + i)) for i, p in enumerate(PROMPTS)]
    pieces: dict[str, list[int]] = {i: [] for i in ids}
    final = {}
    for out in engine.stream():
        pieces[out.request_id] += out.new_token_ids
        if out.finished:
            final[out.request_id] = out
    for i, rid in enumerate(ids):
        assert pieces[rid] == final[rid].token_ids and len(pieces[rid]) == 5 + i
        assert final[rid].finish_reason == "length"
        m = final[rid].metrics
        assert m.arrival_s <= m.first_token_s <= m.finish_s


@pytest.mark.parametrize("make", [lambda m: Engine(m, max_num_seqs=3, block_size=4),
                                  lambda m: StaticEngine(m, max_batch=3)], ids=["continuous", "static"])
def test_seeded_sampling_does_not_depend_on_the_batch(model, make):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=7)
    alone = make(model).generate([PROMPTS[1]], params)[0].token_ids
    batched = make(model).generate(PROMPTS, params)[1].token_ids
    other_seed = make(model).generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=1.0, seed=8))
    assert batched == alone
    assert other_seed[0].token_ids != alone


def test_a_stop_id_ends_the_request_and_is_kept(model):
    greedy = decode(model, torch.tensor([PROMPTS[0]]), 10).new_tokens[0].tolist()
    stop = greedy[3]
    out = Engine(model).generate([PROMPTS[0]], SamplingParams(max_tokens=10, stop_ids=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy[: greedy.index(stop) + 1]


def test_abort_frees_the_cache_and_reports_abort(model):
    engine = Engine(model, max_num_seqs=1, block_size=4)
    running = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=30))
    waiting = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=30))
    engine.step()
    assert engine.abort(running) and engine.abort(waiting)
    assert not engine.abort(running)  # already gone
    outs = {o.request_id: o for o in engine.step()}
    assert outs[running].finish_reason == outs[waiting].finish_reason == "abort"
    assert len(outs[running].token_ids) >= 1 and outs[waiting].token_ids == []
    assert not engine.has_unfinished()
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks


def test_every_block_returns_to_the_pool_when_requests_finish(model):
    engine = Engine(model, max_num_seqs=3, block_size=2, num_blocks=10)
    engine.generate(PROMPTS * 2, SamplingParams(max_tokens=9))
    assert engine.counters["preemptions"] > 0  # the small pool forced some
    assert engine.cache.allocator.num_free == 10 and engine.cache.sequences() == []


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([], SamplingParams(), "empty"),
    ([61], SamplingParams(), "outside the model's vocabulary"),
    (list(range(1, 60)) + [1] * 10, SamplingParams(), "leaves no room"),
    ([1, 2], SamplingParams(max_tokens=40), "more than the whole pool"),
])
def test_bad_requests_are_refused_with_the_reason(model, prompt, params, message):
    engine = Engine(model, block_size=4, num_blocks=5)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


def test_bad_settings_and_duplicate_ids_are_refused(model):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    engine = Engine(model)
    engine.add_request([1], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([2], request_id="a")


def test_a_full_queue_refuses_new_requests(model):
    engine = StaticEngine(model, max_queue=2)
    engine.add_request([1])
    engine.add_request([2])
    with pytest.raises(QueueFull, match="max_queue=2"):
        engine.add_request([3])


def test_the_response_cache_answers_a_repeat_without_the_model(model):
    engine = Engine(model, response_cache=ResponseCache())
    params = SamplingParams(max_tokens=6)
    first = engine.generate([PROMPTS[1]], params)[0]
    forwards = engine.counters["forwards"]
    again = engine.generate([PROMPTS[1]], params)[0]
    assert again.token_ids == first.token_ids and again.metrics.response_cache_hit
    assert engine.counters["forwards"] == forwards
    longer = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=7))[0]  # other settings: not a hit
    assert not longer.metrics.response_cache_hit and longer.token_ids[:6] == first.token_ids
    sampled = SamplingParams(max_tokens=6, temperature=1.0)  # unseeded sampling is never cached
    engine.generate([PROMPTS[1]], sampled)
    assert not engine.generate([PROMPTS[1]], sampled)[0].metrics.response_cache_hit


def test_prefix_caching_reuses_the_shared_prompt(model):
    engine = Engine(model, max_num_seqs=1, block_size=4, prefix_caching=True)
    system = list(range(1, 21))
    outs = engine.generate([system + [30, 31], system + [40]], SamplingParams(max_tokens=4))
    assert outs[0].metrics.cached_prompt_tokens == 0
    assert outs[1].metrics.cached_prompt_tokens == 20
    assert engine.prefix_stats()["hit_blocks"] == 5


def test_the_cli_serves_a_jsonl_file_and_reports_percentiles(tmp_path):
    from impl.zoo import save_dir

    chars = [chr(c) for c in range(32, 93)]  # 61 characters: a character-level model
    config, state = random_gpt(1, 1, 2, 8, len(chars), block_size=64)
    model_dir = tmp_path / "model"
    save_dir(model_dir, GPT.from_state(config, state), {"model_config": config,
                                                        "tokenizer": {"kind": "char", "chars": chars}})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt": "ROMEO:", "max_tokens": 3}\n')
    out = tmp_path / "answers.jsonl"
    run = subprocess.run([sys.executable, "-m", "impl.engine", str(prompts), "--model", str(model_dir),
                          "--max-tokens", "5", "--no-progress", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 requests, 8 tokens" in run.stdout and "p99" in run.stdout
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(a["token_ids"]) for a in answers] == [5, 3]
    run = subprocess.run([sys.executable, "-m", "impl.engine", str(prompts), "--model", str(model_dir),
                          "--draft", str(model_dir), "--max-tokens", "5", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 requests, 8 tokens" in run.stdout and "acceptance_rate 1.0" in run.stdout  # a model drafting for itself
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1]}\n{"text": "no prompt"}\n')
    run = subprocess.run([sys.executable, "-m", "impl.engine", str(bad), "--model", str(model_dir)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "bad.jsonl:2" in run.stderr
