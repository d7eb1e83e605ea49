"""Shared test setup: a tiny-model module importable by reference, and a clean cwd."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

# ``tests`` is not a package: put it on sys.path so that ``tiny_models:mlp`` is an
# importable reference for slimkit.zoo.models._load_callable (used by serialize.load).
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture
def one_thread():
    """Tiny convolutions run far faster on one thread than on two when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_new_files_in_cwd():
    """Fail a test that leaves new files in the working directory: use tmp_path."""
    cwd = Path.cwd()
    before = set(os.listdir(cwd))
    yield
    after = set(os.listdir(cwd))
    new = sorted(after - before)
    if new:
        pytest.fail(f"the test left new files in the working directory {cwd}: {new}; write to tmp_path")
