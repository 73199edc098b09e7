"""Fixtures of the select tests; the run builders they use live in ``select_fixtures.py``."""

from __future__ import annotations

import pytest
from select_fixtures import build_run


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models and matrices: one intra-op thread is as fast, and does not collapse when
    other processes share the cores (restored after each module)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_run(tmp_path):
    return build_run(tmp_path)
