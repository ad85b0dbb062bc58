"""Test-wide settings: deterministic seeds, a fixed thread count, and the backends to test on this machine."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Model, data, training and evaluation tests run single-threaded: their tiny shapes gain nothing from threads, and
# on a loaded 2-core machine OpenMP spin-waiting made a tiny BERT step ~18x slower with 2 threads than with 1
# (0.55 s vs 0.03 s).
ONE_THREAD_DIRS = {"data", "eval", "models", "train"}


@pytest.fixture(autouse=True)
def _one_thread(request):
    if request.path.relative_to(Path(__file__).parent).parts[0] not in ONE_THREAD_DIRS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Without a GPU, Triton kernels run on CPU tensors in the interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
