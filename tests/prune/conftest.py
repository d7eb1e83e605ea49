"""Shared by the pruning tests."""

import pytest


@pytest.fixture(autouse=True)
def _prune_tests_on_one_thread(one_thread):
    """Every pruning test runs tiny convolutions: one thread (see tests/conftest.py)."""
