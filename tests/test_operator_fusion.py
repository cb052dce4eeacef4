"""Unit tests of project 25 beyond its spec checks: the textbook compositions against torch's own
ops, the fused GPT's gradients and weights, torch.compile / onnxruntime logits, TorchScript's
failure on the attention registry, the errors users see (no compiler, no CUDA, CPU tensors for GPU
kernels), and that the Triton kernels compile for a GPU (the interpreter runs them, never compiles).

The spec checks (tests/test_specs.py, ``-k operator_fusion``) pin every fused op (Triton and C++)
and the Triton backwards to the unfused compositions on odd shapes, fp32 and bf16, with mutants,
and the fused / traced GPT's logits to eager's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.measure import Context, NotApplicable
from impl.gpt.attention import get_attention
from impl.gpt.model import GPT, GPTConfig
from impl.operator_fusion import cpp, naive
from impl.operator_fusion.model import compiled, fused_copy, ort_session
from tests.cases.operator_fusion import rows_case, same_logits_as_eager, scores_case


def _tiny_gpt(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{"vocab_size": 50, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})
    return GPT(config).eval()


def test_naive_compositions_equal_torch_builtin_ops():
    case = rows_case(0, (3, 4), 100)
    x, w, b, r = (case[k].double() for k in ("x", "weight", "bias", "residual"))
    torch.testing.assert_close(naive.bias_gelu(x, b), F.gelu(x + b, approximate="tanh"))
    torch.testing.assert_close(naive.bias_gelu(x, b, approximate="none"), F.gelu(x + b))
    torch.testing.assert_close(naive.layer_norm(x, w, b, 1e-5), F.layer_norm(x, (100,), w, b, 1e-5))
    s, y = naive.add_layer_norm(x, r, w, b)
    torch.testing.assert_close(y, F.layer_norm(x + r, (100,), w, b, 1e-5))
    scores = scores_case(1, 1, 2, 7, 19, True, 0.25)["scores"].double()
    mask = torch.ones(7, 19, dtype=torch.bool).tril(diagonal=19 - 7)  # bottom-right causal
    expected = torch.softmax((0.25 * scores).masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(naive.scaled_masked_softmax(scores, 0.25, True), expected)


def test_gelu_rejects_an_unknown_form():
    with pytest.raises(ValueError, match="'tanh' or 'none'"):
        naive.gelu(torch.zeros(2), approximate="sigmoid")


def test_fused_copy_keeps_parameter_names_and_leaves_the_model_untouched():
    model = _tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fused_copy(model, "naive")
    assert list(fused.state_dict()) == list(before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert type(model.blocks[0]).__name__ == "Block" and type(fused.blocks[0]).__name__ == "FusedBlock"


@pytest.mark.parametrize("backend", ["naive", "cpp", "triton", "triton_softmax"])
def test_fused_gpt_gives_eager_logits_on_every_backend(backend):
    same_logits_as_eager(lambda m, idx: fused_copy(m, backend)(idx), seq_len=20, n_head=2, n_embd=24, bias=True,
                         batch=2, seed=3)


def test_triton_fused_gpt_trains_like_eager():
    model = _tiny_gpt(1)
    fused = fused_copy(model, "triton_softmax")
    idx = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, fused):
        m.zero_grad()
        m(idx).logsumexp(-1).mean().backward()
        grads.append({name: p.grad for name, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_torch_jit_script_cannot_compile_the_gpt():
    # why the model is traced (model.traced), never scripted: GPT.forward takes keyword-only arguments,
    # and the attention layer's forward is annotated with the KV-cache Protocol (bodies of `...`)
    model = _tiny_gpt()
    with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only arguments"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match="KVCacheLike"):
        torch.jit.script(model.blocks[0].attn)


def test_torch_jit_script_compiles_a_backend_taken_from_the_attention_registry():
    # the registry itself is no obstacle: a function-valued attribute from it compiles and runs
    class RegistryAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attend = get_attention("sdpa")

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return self.attend(q, q, q, True)

    q = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(torch.jit.script(RegistryAttention())(q), RegistryAttention()(q))


def test_torch_compile_gives_eager_logits():
    same_logits_as_eager(lambda m, idx: compiled(m)(idx), seq_len=16, n_head=2, n_embd=16, bias=True, batch=2,
                         seed=4)


def test_onnxruntime_session_gives_eager_logits(tmp_path):
    same_logits_as_eager(lambda m, idx: ort_session(m, idx, tmp_path / "gpt.onnx", threads=1)(idx), seq_len=16,
                         n_head=2, n_embd=16, bias=True, batch=2, seed=5)


def test_cpp_ops_name_the_missing_compiler(monkeypatch):
    monkeypatch.setattr(cpp, "_module", None)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler: 'no-such-compiler-xyz' is not on PATH"):
        cpp.bias_gelu(torch.zeros(2, 3), torch.zeros(3))


def test_cpp_ops_refuse_other_dtypes_and_mismatched_shapes():
    with pytest.raises(RuntimeError, match="must be float32"):
        cpp.layer_norm(torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(3), torch.zeros(3))
    with pytest.raises(RuntimeError, match="must have shape"):
        cpp.bias_gelu(torch.zeros(2, 3), torch.zeros(4))


def test_cpp_ops_take_non_contiguous_inputs():
    x = torch.randn(6, 8).t()  # (8, 6), strided
    w, b = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(cpp.layer_norm(x, w, b), naive.layer_norm(x, w, b), rtol=1e-5, atol=1e-5)


def test_cuda_ops_are_not_applicable_on_a_cpu_only_torch():
    from impl.operator_fusion import cuda

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(cuda.CudaUnavailable, match="CPU-only build|no CUDA GPU"):
        cuda.load()


def test_triton_kernels_refuse_cpu_tensors_without_the_interpreter(monkeypatch):
    from impl.operator_fusion import triton_kernels as tk

    monkeypatch.setattr(tk, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tk.layer_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(4))


def test_liger_reference_refuses_cpu_tensors():
    from reference import liger

    with pytest.raises(ValueError, match="CUDA tensors"):
        liger.layer_norm(torch.zeros(2, 4), torch.ones(4), torch.zeros(4))


@pytest.mark.parametrize("workload", ["triton_fused_speedup", "liger_ratio"])
def test_cuda_workloads_are_not_applicable_on_cpu(workload):
    from benchmarks.workloads import operator_fusion as wl

    with pytest.raises(NotApplicable, match="CUDA GPU"):
        getattr(wl, workload)(Context(quick=True, device="cpu"))


def test_a_fused_side_with_other_logits_is_an_error_not_a_figure():
    from benchmarks.workloads.operator_fusion import _require_same_logits

    ref = torch.zeros(2, 3)
    assert _require_same_logits("same", ref + 1e-6, ref) <= 1e-6
    with pytest.raises(RuntimeError, match="not the same computation"):
        _require_same_logits("other", ref + 0.5, ref)
    with pytest.raises(RuntimeError, match="not the same computation"):
        _require_same_logits("nan", ref + math.nan, ref)


def test_triton_kernels_compile_for_an_h100():
    from tests.test_flash_attention import compile_for_h100

    module, p = "impl.operator_fusion.triton_kernels", "*bf16"
    compile_for_h100([
        (module, "_bias_gelu_fwd_kernel", {"X": p, "B": p, "Y": p, "n": "i32", "C": "i32"},
         {"TANH": True, "BLOCK": 1024}),
        (module, "_layer_norm_fwd_kernel", {"X": p, "R": p, "S": p, "W": p, "B": p, "Y": p, "MEAN": "*fp32",
                                            "RSTD": "*fp32", "C": "i32", "eps": "fp32"},
         {"HAS_RESIDUAL": True, "BLOCK_C": 4096}),
        (module, "_layer_norm_bwd_kernel", {"S": p, "W": p, "DY": p, "DS": p, "MEAN": "*fp32", "RSTD": "*fp32",
                                            "DX": p, "DW_PART": "*fp32", "DB_PART": "*fp32", "N": "i32", "C": "i32",
                                            "rows_per_program": "i32"},
         {"HAS_DS": True, "BLOCK_C": 4096}),
        (module, "_softmax_fwd_kernel", {"X": p, "Y": p, "T": "i32", "S": "i32", "kv_offset": "i32", "scale": "fp32"},
         {"CAUSAL": True, "BLOCK_S": 1024}),
        (module, "_bias_gelu_bwd_kernel", {"X": p, "B": p, "DY": p, "DX": p, "n": "i32", "C": "i32"},
         {"TANH": True, "BLOCK": 1024}),
        (module, "_softmax_bwd_kernel", {"Y": p, "DY": p, "DX": p, "S": "i32", "scale": "fp32"}, {"BLOCK_S": 1024}),
    ])  # fmt: skip
