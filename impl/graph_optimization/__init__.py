"""Project 26: graph optimization. The shared GPT exported to ONNX (a prefill graph and a decode-step
graph with the KV cache as explicit tensors), run by ONNX Runtime at each graph optimization level,
the same forward compiled whole by XLA (a JAX port under ``jax.jit``), and a TensorRT path (CUDA only).

- ``export.py``: the graphs (``ExplicitKV``: the model's cache seam over explicit tensors), the export
  cache, the eager sides of the checks;
- ``ort.py``: sessions per level, optimized graphs saved and counted, greedy generation through ORT;
- ``jax_gpt.py``: the forward in ``jax.numpy`` from the torch weights, ``jax.jit``;
- ``tensorrt.py``: TensorRT engine of the prefill graph (the ``trt`` extra, n/a without CUDA).
"""
