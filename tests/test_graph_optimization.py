"""Unit tests of project 26: the explicit-K/V wrapper is the model's own computation, the export cache,
fixed-shape graphs are really fixed, each ORT level saves a graph no larger than the level below, the
CLI, the JAX port's context check and the TensorRT path's reason for being n/a here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impl.gpt.attention import sdpa_attention
from impl.gpt.model import GPT, GPTConfig
from impl.graph_optimization import __main__ as cli
from impl.graph_optimization import export, jax_gpt, ort, tensorrt
from impl.kv_cache.fast import KVCache

TS = "torchscript"  # the legacy exporter: under a second per graph, the dynamo one 10-20 s (one test uses it)


def tiny_gpt(seed: int = 0, bias: bool = True) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16, bias=bias)).eval()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDSON_CACHE", str(tmp_path / "cache"))
    ort.cached_session.cache_clear()


@pytest.mark.parametrize(("T", "S"), [(1, 1), (5, 5), (1, 9), (3, 11)])
def test_explicit_attention_equals_sdpa_for_a_prompt_and_for_queries_after_a_cache(T, S):
    gen = torch.Generator().manual_seed(T * 100 + S)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (T, S, S))
    torch.testing.assert_close(export.explicit_attention(q, k, v, True), sdpa_attention(q, k, v, True))


def test_explicit_kv_cache_gives_the_kv_cache_logits_and_hands_out_past_plus_new_keys():
    model = tiny_gpt()
    ids = torch.randint(37, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 9)
        model(ids[:, :6], cache=cache)
        want = model(ids[:, 6:], cache=cache)
        prefill = export.ExplicitKV()
        model(ids[:, :6], cache=prefill)
        step = export.ExplicitKV(prefill.keys, prefill.values)
        got = model(ids[:, 6:], cache=step, position_ids=torch.arange(6, 9).expand(2, 3))
    torch.testing.assert_close(got, want)
    assert step.position == 9
    for layer in range(2):
        torch.testing.assert_close(step.keys[layer], cache.k[layer])
        torch.testing.assert_close(step.values[layer], cache.v[layer])


def test_cached_graph_reuses_the_file_for_the_same_weights_and_exports_again_for_others():
    model = tiny_gpt()
    first = export.cached_graph(model, "prefill", exporter=TS)
    stamp = first.stat().st_mtime_ns
    assert export.cached_graph(tiny_gpt(), "prefill", exporter=TS) == first and first.stat().st_mtime_ns == stamp
    assert export.cached_graph(tiny_gpt(seed=1), "prefill", exporter=TS) != first
    assert export.cached_graph(model, "prefill", dynamic=False, exporter=TS) != first


def test_a_fixed_shape_graph_refuses_another_shape_and_a_dynamic_one_takes_it():
    model = tiny_gpt()
    fixed = ort.session(export.cached_graph(model, "prefill", dynamic=False, batch=2, length=5, exporter=TS))
    dynamic = ort.session(export.cached_graph(model, "prefill", exporter=TS))
    ids = np.zeros((3, 7), dtype=np.int64)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        fixed.run(None, {"ids": ids})
    assert dynamic.run(None, {"ids": ids})[0].shape == (3, 7, 37)


def test_each_ort_level_saves_its_graph_with_no_more_nodes_than_the_level_below(tmp_path):
    report = ort.level_report(export.cached_graph(tiny_gpt(), "prefill", exporter=TS), tmp_path)
    totals = [report[name]["total"] for name in ("exported", *ort.LEVELS)]
    assert all(a >= b for a, b in zip(totals, totals[1:], strict=False)), totals
    assert totals[-1] < totals[0], f"ORT_ENABLE_ALL removed no node: {totals}"
    for level in ort.LEVELS:
        saved = tmp_path / f"prefill.{level}.onnx"
        assert saved.exists() and sum(ort.node_counts(saved).values()) == report[level]["total"]


def test_the_legacy_torchscript_exporter_gives_the_dynamo_graphs_logits(tmp_path):
    model = tiny_gpt(bias=False)
    ids = np.random.default_rng(0).integers(0, 37, (2, 11))
    legacy = export.export_graph(model, tmp_path / "legacy.onnx", "prefill", exporter="torchscript")
    dynamo = export.cached_graph(model, "prefill")
    out = [ort.session(p).run(None, {"ids": ids})[0] for p in (legacy, dynamo)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5)


def test_cli_exports_both_graphs_and_prints_node_counts_per_level(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.zoo, "load", lambda name: (tiny_gpt(), None, {}))
    assert cli.main(["export", "tiny", "--out", str(tmp_path), "--exporter", TS]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["decode.onnx", "prefill.onnx"]
    assert cli.main(["levels", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "decode.onnx" in out and "prefill.onnx" in out and "total" in out and "MatMul" in out
    assert (tmp_path / "optimized" / "prefill.all.onnx").exists()


def test_jax_port_refuses_a_sequence_longer_than_the_context():
    model = tiny_gpt()
    port = jax_gpt.JaxGPT(model.config.to_dict(), model.state_dict())
    with pytest.raises(ValueError, match="block_size"):
        port(np.zeros((1, 25), dtype=np.int64))


def test_tensorrt_says_why_it_cannot_run_on_a_machine_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    reason = tensorrt.unavailable_reason()
    assert reason is not None and "CUDA" in reason
    with pytest.raises(tensorrt.TensorRTUnavailable, match="CUDA"):
        tensorrt.build_engine("unused.onnx", 1, 1)
