"""Shared pytest set-up: Triton runs in its interpreter when no GPU is present."""

import os

# Triton's interpreter runs tl.dot as a numpy matmul: OpenBLAS threads fighting torch's for the
# same 2 cores made kernel calls ~8x slower. Must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # must be set before triton is first imported; on CPU the kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402

from harness.measure import git_commit  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stamp_commit(record_testsuite_property):
    """The JUnit XML of a run names its commit: the report counts the checks only for that commit."""
    record_testsuite_property("commit", git_commit())
