"""Checkpoints trained from a demo-tower VLM - ``sft/model`` and a policy's ``backbone/`` - load and generate in
plain transformers (a process where importing midtrain fails)."""

from __future__ import annotations

import pytest
from catalog_rows import vlm_rows, write_catalog
from plain_transformers import run_without_midtrain

from midtrain.models import load_vlm
from midtrain.runs import RunDir


@pytest.fixture(scope="module")
def demo_tower_vlm(tiny_parts, tmp_path_factory):
    from midtrain.align.assemble import assemble_vlm

    return assemble_vlm(tmp_path_factory.mktemp("fastvlm") / "vlm", "efficientnet-lite0", str(tiny_parts["lm"]), None, seed=0)


def test_sft_model_loads_without_midtrain(demo_tower_vlm, tmp_path):
    from midtrain.sft.config import SFTConfig
    from midtrain.sft.stage import run_sft

    run = RunDir(tmp_path / "run")
    write_catalog(run.root, {"llava": vlm_rows(8)})
    train = {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 0, "save_every": 0, "num_workers": 0}
    out = run_sft(SFTConfig(model=str(demo_tower_vlm), sources=["llava"], mode="lora", val_fraction=0, train=train), run)
    report = run_without_midtrain(out / "model")
    assert report["class"] == "FastVlmForConditionalGeneration" and report["new_tokens"] >= 1 and not report["midtrain_loaded"]


def test_policy_backbone_loads_without_midtrain(demo_tower_vlm, tmp_path):
    from midtrain.policy.backbone import Backbone

    vlm, processor = load_vlm(demo_tower_vlm, dtype="float32", device="cpu")
    Backbone(vlm, processor).save_pretrained(tmp_path / "backbone")
    report = run_without_midtrain(tmp_path / "backbone")
    assert report["class"] == "FastVlmForConditionalGeneration" and report["new_tokens"] >= 1


def test_featurize_takes_a_demo_tower_vlm(demo_tower_vlm, tmp_path):
    import numpy as np
    from catalog_rows import vla_rows

    from midtrain.data.features import open_features
    from midtrain.featurize.config import FeaturizeConfig
    from midtrain.featurize.stage import featurize

    run = RunDir(tmp_path / "run")
    write_catalog(run.root, {"llava": vlm_rows(5, seed=1), "robot": vla_rows(3, seed=2)})
    out = featurize(FeaturizeConfig(model=str(demo_tower_vlm), shard_size=8, batch_size=4, num_workers=0), run)
    features = open_features(out)
    assert len(features) == 8 and features.dim == 32
    assert np.isfinite(np.concatenate([features.array(n) for n in features.names]).astype(np.float32)).all()
