"""Device names for the stages that run torch (featurize, gap, score): one rule everywhere."""

from __future__ import annotations

from .runs import StageError


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an explicit name is checked and returned."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} requested but no CUDA GPU is visible; use device: cpu or auto")
    return name
