"""Eval tests run single-threaded (tiny shapes; see tests/models/conftest.py for the measured reason)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
