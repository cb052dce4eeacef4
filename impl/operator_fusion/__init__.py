"""Project 25, operator fusion: the GPT's elementwise and row-wise ops fused by hand and by compilers.

- ``naive.py``: the unfused compositions (bias + GELU, LayerNorm, residual add + LayerNorm,
  attention's scaled masked softmax), what eager PyTorch runs;
- ``triton_kernels.py``: each as one Triton kernel, forward and backward (CUDA, or CPU in the
  interpreter with TRITON_INTERPRET=1);
- ``cpp/``: bias + GELU, LayerNorm and residual add + LayerNorm as one C++ loop each (float32
  CPU, built at first use by torch.utils.cpp_extension);
- ``cuda/``: bias + GELU and residual add + LayerNorm as CUDA kernels (built only where torch has
  CUDA and nvcc exists);
- ``model.py``: the shared GPT with those ops swapped in by module replacement, and the same
  model through torch.jit.trace, torch.compile and onnxruntime.
"""
