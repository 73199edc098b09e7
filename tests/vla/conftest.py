"""Fixtures of the vla stage tests: one torch thread (the suite shares a small, busy machine, where
two threads per process mostly wait for each other)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
