"""Fixtures of the gap tests (helpers live in gap_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gap_fixtures import write_features


@pytest.fixture(scope="session")
def features_dir(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The gap tests use small matrices: one thread avoids OpenMP spin-waiting on a shared, busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
