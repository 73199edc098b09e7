"""Shared test fixtures: tiny VLMs of the real architectures (built once per session, lazily) and
small catalogs (helpers in ``catalog_rows.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MIDTRAIN_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """``tiny_vlm(arch, size="test") -> Path``: a saved tiny random VLM, built on first use per session."""
    from midtrain.models.tiny import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlms")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, size: str = "test") -> Path:
        key = (arch, size)
        if key not in built:
            built[key] = build_tiny_vlm(arch, root / f"{arch}-{size}", size=size)
        return built[key]

    return get


@pytest.fixture(scope="session")
def loaded_vlm(tiny_vlm):
    """``loaded_vlm(arch) -> (model, processor)`` loaded once per session through ``load_vlm``."""
    from midtrain.models import load_vlm

    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_vlm(tiny_vlm(arch), dtype="float32", device="cpu")
        return cache[arch]

    return get
