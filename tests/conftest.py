"""Shared pytest set-up: Triton runs in its interpreter when no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before triton is first imported; on CPU the kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
