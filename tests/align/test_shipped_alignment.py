"""The checked-in alignment of the demo VLM (``models/aligned/demo_smollm2``): small, its manifest says how it
was made and is the recipe of ``configs/align.yaml``; a short rebuild of that recipe learns (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from midtrain.align.config import AlignConfig
from midtrain.config import from_dict, output_settings
from midtrain.models.causal_demo_vlm import ALIGNED_DEMO

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "align.yaml"


def recipe(**overrides) -> AlignConfig:
    data = yaml.safe_load(RECIPE.read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(AlignConfig, data)


def test_the_shipped_alignment_is_small_and_made_by_the_recipe():
    manifest = json.loads((ALIGNED_DEMO / "manifest.json").read_text())
    sizes = {p.name: p.stat().st_size for p in ALIGNED_DEMO.iterdir()}
    assert {"projector.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= set(sizes)
    assert sum(sizes.values()) < 12e6
    # the checked-in config is the recipe file's (what decides the output; throughput settings may be added later)
    assert output_settings(from_dict(AlignConfig, manifest["config"])) == output_settings(recipe())
    assert "configs/align.yaml" in manifest["rebuild"] and len(manifest["corpus_sha256"]) == 64
    assert {"transformers", "torch"} <= set(manifest["versions"])
    for phase in ("pretrain", "finetune"):
        assert manifest["training"][phase]["final_loss"] < manifest["training"][phase]["first_loss"]


@pytest.mark.slow
def test_the_shipped_corpus_hash_is_the_synthetic_webs(tmp_path):
    """The corpus is a function of the recipe: drawing it again gives the hash in the manifest."""
    from midtrain.align.ship import corpus_hash
    from midtrain.sim.web import WEB_KINDS, write_web_corpus

    config = recipe()
    write_web_corpus(tmp_path, {k: config.corpus.size_of(k) for k in WEB_KINDS}, config.seed, "train", config.corpus.image_size)
    assert corpus_hash(tmp_path) == json.loads((ALIGNED_DEMO / "manifest.json").read_text())["corpus_sha256"]


@pytest.mark.slow
def test_a_short_rebuild_of_the_recipe_learns(tmp_path, smollm2, monkeypatch):
    """The recipe at a fraction of its budget: both stages' losses fall and the aligned VLM answers.

    (Held-out accuracy is not asserted: the full recipe itself is near chance on most kinds - docs/align.md.)"""
    from midtrain.align.evaluate import generate_answers, heldout_samples
    from midtrain.align.stage import run_align
    from midtrain.models import load_vlm
    from midtrain.models import smollm2 as smollm2_module
    from midtrain.runs import RunDir

    monkeypatch.setattr(smollm2_module, "load_smollm2", lambda: smollm2)  # the session's one GGUF load
    config = recipe(**{"corpus.samples_per_kind": 12, "pretrain.steps": 12, "finetune.steps": 40, "pretrain.save_every": 0,
                       "finetune.save_every": 0})  # fmt: skip
    out = run_align(config, RunDir(tmp_path / "run"))
    training = json.loads((out / "manifest.json").read_text())["training"]
    for phase in ("pretrain", "finetune"):
        assert training[phase]["final_loss"] < training[phase]["first_loss"], training
    vlm, processor = load_vlm(out / "model", dtype="float32", device="cpu")
    held = heldout_samples(2, kinds=("colour", "scene"))
    assert len(generate_answers(vlm, processor, held)) == 4
