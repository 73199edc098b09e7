"""An autouse fixture for training tests: one intra-op torch thread.

On this project's shared 2-core machine two OpenMP threads spin-wait against other processes:
a tiny VLM's training step measured ~80x slower than with one thread. Import it into a
folder's conftest (``from torch_threads import one_thread``) to apply it there.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
