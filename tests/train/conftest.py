"""Model tests run single-threaded: their tiny shapes gain nothing from threads, and on a loaded 2-core machine
OpenMP spin-waiting made a tiny BERT step ~18x slower with 2 threads than with 1 (0.55 s vs 0.03 s)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
