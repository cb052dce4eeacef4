"""The shared GPT with its ops fused, four ways, without editing ``impl/gpt``.

1. Hand-written kernels by module replacement (``fused_copy(model, "cpp" | "triton" | "naive")``):
   a copy of the model whose blocks compute, with the same parameters under the same names,
   ::

       h = attn(layer_norm(x))                  # ln_1: one kernel
       x, n = add_layer_norm(x, h, ln_2)        # residual add + ln_2: one kernel, not two
       x = x + c_proj(bias_gelu(x_n @ W_fc))    # c_fc's bias + GELU: one kernel after the matmul

   and ``ln_f`` is one LayerNorm kernel. ``"triton_softmax"`` also swaps the attention for one
   whose scale + causal mask + softmax is one kernel (``softmax_attention``); ``"triton"`` keeps
   the model's attention (SDPA: on a GPU already a fused flash kernel). ``"naive"`` runs the same
   structure on the unfused compositions of ``naive.py`` (what the fused kernels must equal).
2. ``traced(model, idx)``: ``torch.jit.trace``. Scripting (``torch.jit.script``) fails on this
   model: ``GPT.forward`` has keyword-only arguments and the attention's forward is annotated with
   the KV-cache ``Protocol`` (the backend registry itself would compile: see the README).
3. ``compiled(model)``: ``torch.compile`` (Inductor: on CPU it generates C++ / OpenMP loops that
   fuse the elementwise and reduction ops between matmuls).
4. ``ort_session(model, idx)``: export to ONNX once, run with onnxruntime's graph optimizations on
   (``ORT_ENABLE_ALL``: LayerNorm, GELU, attention and bias fusions at the graph level).

All of these are inference paths for one batch shape without a KV cache; only ``"triton"`` (and
``"naive"``) keep a backward.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from impl.gpt.attention import sdpa_attention
from impl.gpt.model import GPT, MLP, Block
from impl.operator_fusion import naive


@dataclass(frozen=True)
class FusedOps:
    """The three fused ops a block needs (``naive.py``'s signatures) and, optionally, an attention."""

    bias_gelu: Callable[..., torch.Tensor]
    layer_norm: Callable[..., torch.Tensor]
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention: Callable[..., torch.Tensor] | None = None


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention (B, nh, T, hs) with the scale, causal mask and softmax fused in one Triton kernel
    (the two matmuls stay torch's). Ragged batches (``key_valid``) run SDPA."""
    if key_valid is not None:
        return sdpa_attention(q, k, v, causal, key_valid)
    from impl.operator_fusion.triton_kernels import scaled_masked_softmax

    weights = scaled_masked_softmax(q @ k.transpose(-2, -1), 1.0 / math.sqrt(q.shape[-1]), causal)  # (B, nh, T, S)
    return weights @ v


def ops_for(backend: str) -> FusedOps:
    """The op set of ``backend``: ``cpp`` (fp32 CPU extension), ``triton`` (CUDA, or CPU in the
    interpreter; the model's own attention kept), ``triton_softmax`` (the same, and attention's
    softmax as a Triton kernel) or ``naive`` (the unfused compositions)."""
    if backend == "cpp":
        from impl.operator_fusion import cpp

        return FusedOps(cpp.bias_gelu, cpp.layer_norm, cpp.add_layer_norm)
    if backend in ("triton", "triton_softmax"):
        from impl.operator_fusion import triton_kernels as tk

        attention = softmax_attention if backend == "triton_softmax" else None
        return FusedOps(tk.bias_gelu, tk.layer_norm, tk.add_layer_norm, attention)
    if backend == "naive":
        return FusedOps(naive.bias_gelu, naive.layer_norm, naive.add_layer_norm)
    raise ValueError(f"unknown fusion backend {backend!r}; known: cpp, triton, triton_softmax, naive")


def _ln_params(ln: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    bias = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)  # GPTConfig(bias=False)
    return ln.weight, bias


class FusedLayerNorm(nn.Module):
    """An ``nn.LayerNorm``'s weight and bias (same names) run through a fused kernel."""

    def __init__(self, ln: nn.LayerNorm, ops: FusedOps):
        super().__init__()
        self.weight, self.bias, self.eps, self.ops = ln.weight, ln.bias, ln.eps, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, *_ln_params(self), self.eps)


class FusedMLP(nn.Module):
    """GPT-2's MLP with c_fc's bias add and the GELU in one kernel after a bias-free matmul."""

    def __init__(self, mlp: MLP, ops: FusedOps):
        super().__init__()
        self.c_fc, self.c_proj, self.ops = mlp.c_fc, mlp.c_proj, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.c_fc.weight)  # (B, T, 4C), the bias is added inside the fused kernel
        bias = self.c_fc.bias if self.c_fc.bias is not None else torch.zeros_like(h[0, 0])
        return self.c_proj(self.ops.bias_gelu(h, bias))


class FusedBlock(nn.Module):
    """``Block`` with the residual add before ln_2 fused into it; same submodules, same names."""

    def __init__(self, block: Block, ops: FusedOps):
        super().__init__()
        if not isinstance(block.mlp, MLP):
            raise ValueError(f"fusion knows GPT-2's MLP, not {type(block.mlp).__name__} (ffn={block.mlp!r})")
        self.ln_1 = FusedLayerNorm(block.ln_1, ops)
        self.attn = block.attn
        self.ln_2 = FusedLayerNorm(block.ln_2, ops)
        self.mlp = FusedMLP(block.mlp, ops)
        self.ops = ops
        if ops.attention is not None:
            self.attn.attend = ops.attention

    def forward(self, x: torch.Tensor, cache: object = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn(self.ln_1(x), cache, key_valid)
        x, n = self.ops.add_layer_norm(x, h, *_ln_params(self.ln_2), self.ln_2.eps)  # (B, T, C) twice
        return x + self.mlp(n)


def fused_copy(model: GPT, backend: str = "cpp", ops: FusedOps | None = None) -> GPT:
    """A deep copy of ``model`` (left untouched) with every block and ``ln_f`` replaced by their fused
    versions on ``backend``'s ops (or ``ops``); ``state_dict`` keys are unchanged."""
    ops = ops or ops_for(backend)
    fused = copy.deepcopy(model)
    if fused.config.dropout and fused.training:
        raise ValueError("fused blocks have no dropout: call model.eval() or use dropout = 0")
    fused.blocks = nn.ModuleList(FusedBlock(block, ops) for block in fused.blocks)
    fused.ln_f = FusedLayerNorm(fused.ln_f, ops)
    return fused


class _LogitsOnly(nn.Module):
    """``model(idx)`` with no optional arguments: the signature tracing and export see."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)


def traced(model: GPT, idx: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``model(idx)`` for batches shaped like ``idx`` (B, T), frozen for inference."""
    with torch.no_grad():
        module = torch.jit.trace(_LogitsOnly(model).eval(), (idx,), check_trace=False)
    return torch.jit.freeze(module)


def compiled(model: GPT, **options: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model)`` (Inductor); compiles on the first call, for each new shape."""
    return torch.compile(model, dynamic=False, **options)


def ort_session(model: GPT, idx: torch.Tensor, path: str | Path | None = None,
                threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Export ``model(idx)`` to ONNX (at ``path``, else a temporary file) and return a function that
    runs token ids shaped like ``idx`` through onnxruntime (CPU, all graph optimizations on). The
    graph onnxruntime optimized is saved beside the export as ``<name>.optimized.onnx`` (its fused
    nodes: Gemm, FusedMatMul, SkipLayerNormalization, ...)."""
    import onnxruntime as ort

    path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="handson-ort-")) / "gpt.onnx"
    with torch.no_grad():
        torch.onnx.export(_LogitsOnly(model).eval(), (idx,), str(path), input_names=["idx"],
                          output_names=["logits"], dynamo=True, external_data=False, verbose=False)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = str(Path(path).with_suffix(".optimized.onnx"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"idx": ids.cpu().numpy()})[0])

    return run


def cpp_fused_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of ``model`` on ``idx`` through a copy fused with the C++ ops."""
    with torch.no_grad():
        return fused_copy(model, "cpp")(idx)


def triton_fused_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of ``model`` on ``idx`` through a copy fused with the Triton kernels, the
    attention softmax included."""
    with torch.no_grad():
        return fused_copy(model, "triton_softmax")(idx)


def traced_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of ``model`` on ``idx`` through its ``torch.jit.trace``."""
    with torch.no_grad():
        return traced(model, idx)(idx)
