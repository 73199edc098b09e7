"""``midtrain sft`` on the demo VLM (LLaVA architecture, convolutional EfficientNet tower with
batch norm): a frozen tower stays bit-identical, batch-norm statistics included; last_fraction
trains the last quarter of its blocks."""

from __future__ import annotations

import json

import pytest
import torch
from catalog_rows import vlm_rows, write_catalog

from midtrain.models import load_vlm
from midtrain.runs import RunDir
from midtrain.sft.config import SFTConfig
from midtrain.sft.stage import run_sft


@pytest.mark.slow
def test_sft_on_the_demo_vlm(tmp_path):
    from midtrain.models.demo_vlm import build_demo_vlm

    base = build_demo_vlm(tmp_path / "demo_vlm")
    run = RunDir(tmp_path / "run")
    write_catalog(run.root, {"llava": vlm_rows(16)})
    train = {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 0, "save_every": 0, "num_workers": 0}
    out = run_sft(SFTConfig(model=str(base), sources=["llava"], mode="full", vision="frozen", train_projector=True,
                            val_fraction=0, train=train), run)  # fmt: skip
    before = load_vlm(base, dtype="float32", device="cpu")[0].state_dict()
    after = load_vlm(out / "model", dtype="float32", device="cpu")[0].state_dict()
    tower = [k for k in before if k.startswith("model.vision_tower.")]
    assert any("running_mean" in k for k in tower)  # batch-norm statistics are part of the tower
    assert all(torch.equal(before[k], after[k]) for k in tower)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.multi_modal_projector."))
    out = run_sft(SFTConfig(name="sft_last", model=str(base), sources=["llava"], mode="lora", vision="last_fraction",
                            val_fraction=0, train=train), run)  # fmt: skip
    man = json.loads((out / "manifest.json").read_text())
    assert man["parts"]["vision_blocks"] == 16 and 0 < man["parameters"]["vision_tower"]["trainable"]
