"""TensorRT over the exported prefill graph (the ``trt`` extra; CUDA only).

TensorRT parses the ONNX graph, fuses layers and picks kernels for the GPU it runs on, and
serializes the result as an engine. Here: build an fp32 (optionally fp16) engine with an
optimization profile over batch and length, and run prefill logits through it. On a machine
without a CUDA device or without the ``tensorrt`` package, ``unavailable_reason`` says why and
``build_engine`` raises ``TensorRTUnavailable`` with that reason (the benchmark reports n/a).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot run here; ``reason`` says what is missing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run on this machine (no CUDA in torch, no GPU, no package), or None."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA; TensorRT needs a CUDA GPU"
    if not torch.cuda.is_available():
        return "no CUDA device is visible; TensorRT needs a CUDA GPU"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (pip install '.[trt]')"
    return None


def build_engine(onnx_path: str | Path, max_batch: int, max_length: int, fp16: bool = False) -> Any:
    """A TensorRT engine of the prefill graph at ``onnx_path`` taking ids (1..max_batch, 1..max_length)."""
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape("ids", (1, 1), (max_batch, max_length), (max_batch, max_length))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def prefill_logits(engine: Any, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits (B, T, vocab) of CUDA ids (B, T) through ``engine`` (buffers are torch CUDA tensors)."""
    context = engine.create_execution_context()
    ids = ids.to(device="cuda", dtype=torch.int64).contiguous()
    context.set_input_shape("ids", tuple(ids.shape))
    buffers: dict[str, torch.Tensor] = {"ids": ids}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name != "ids":
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, device="cuda", dtype=torch.float32)
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    logits = buffers["logits"]
    assert logits.shape[-1] == vocab_size, f"engine returned {logits.shape[-1]} logits per token, expected {vocab_size}"
    return logits
