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


@pytest.fixture(scope="session")
def smollm2():
    """``(LlamaForCausalLM, tokenizer)``: SmolLM2-135M-Instruct dequantised from its GGUF file (~25 s), once per session."""
    from midtrain.models.smollm2 import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def causal_demo_vlm(smollm2, tmp_path_factory):
    """``causal_demo_vlm(text_layers=None) -> Path``: the causal demo VLM (EfficientNet-Lite0 + SmolLM2 in LLaVA,
    seed 0: what ``midtrain demo`` builds) with all 30 or the first ``text_layers`` decoder layers, saved once each."""
    from midtrain.models.causal_demo_vlm import build_causal_demo_vlm

    root = tmp_path_factory.mktemp("causal_demo_vlm")
    built: dict = {}

    def get(text_layers: int | None = None) -> Path:
        if text_layers not in built:
            built[text_layers] = build_causal_demo_vlm(root / f"layers{text_layers}", seed=0, text_layers=text_layers,
                                                       smollm2=smollm2)  # fmt: skip
        return built[text_layers]

    return get
