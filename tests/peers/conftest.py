"""The peers' cases train tiny tensors: one intra-op thread is ~100x faster than two on a busy
2-core machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread):
    yield
