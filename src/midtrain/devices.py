"""Where torch runs, one rule everywhere: device names (featurize, gap, score, ...) and the number of
CPU threads a stage uses (:func:`torch_threads`)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from .runs import StageError


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an explicit name is checked and returned."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} requested but no CUDA GPU is visible; use device: cpu or auto")
    return name


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous setting (None = leave as is)."""
    import torch

    if not n:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)
