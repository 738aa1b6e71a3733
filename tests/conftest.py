"""Fixtures every test folder may use. The helpers they build on (models, data, snapshots) are
plain functions in ``tests/helpers.py``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TinyNet


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors train fastest on one thread, and on shared
    cores torch's extra threads spin. The caller's count is restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
