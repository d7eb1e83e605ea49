"""Shared by the pruning tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run far faster on one thread than on two when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
