"""Test-wide settings: deterministic seeds, a fixed thread count, and the backends to test on this machine."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

# Without a GPU, Triton kernels run on CPU tensors in the interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
