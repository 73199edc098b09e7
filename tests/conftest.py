"""Shared test fixtures: tiny VLMs of the real architectures (built once per session, lazily),
small catalogs (helpers in ``catalog_rows.py``) and dataset sources of every reader format
(helpers in ``catalog_fixtures.py``, used by the data and catalog tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from catalog_fixtures import llava_records, make_lerobot_v3

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


@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    """A LLaVA folder (``data.json``, ``data.jsonl``, ``images/``) per test."""
    root = tmp_path / "llava"
    recs = llava_records(root / "images")
    (root / "data.json").write_text(json.dumps(recs))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


@pytest.fixture(scope="session")
def lerobot_v3(tmp_path_factory) -> tuple[Path, list]:
    """One LeRobot v3.0 dataset per session: ``(root, episodes)``."""
    root = tmp_path_factory.mktemp("lerobot") / "v3"
    return root, make_lerobot_v3(root)


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
