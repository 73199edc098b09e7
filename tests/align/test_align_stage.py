"""``midtrain align`` on tiny parts: both LLaVA stages, the feature cache, the output checkpoint, resume."""

from __future__ import annotations

import json

import pytest
import torch
from plain_transformers import run_without_midtrain

from midtrain.align.config import AlignConfig
from midtrain.align.stage import run_align
from midtrain.models import load_vlm
from midtrain.runs import RunDir

TINY_TRAIN = {"batch_size": 4, "lr": 5e-3, "save_every": 2, "log_every": 1, "num_workers": 0}


def tiny_config(parts, **kw) -> AlignConfig:
    base = dict(vision_tower=str(parts["tower"]), language_model=str(parts["lm"]), corpus={"samples_per_kind": 2, "image_size": 32},
                pretrain={**TINY_TRAIN, "steps": 3}, finetune={**TINY_TRAIN, "steps": 3}, lora={"rank": 4, "alpha": 8},
                max_length=128, num_threads=1)  # fmt: skip
    base.update(kw)
    from midtrain.config import from_dict

    return from_dict(AlignConfig, base)


def test_align_trains_the_projector_then_lora_and_writes_an_ordinary_checkpoint(tiny_parts, tmp_path):
    run = RunDir(tmp_path / "run")
    out = run_align(tiny_config(tiny_parts), run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["pretrain_samples"] == manifest["counts"]["finetune_samples"] == 18
    assert manifest["counts"]["images_cached"] == 18  # each picture through the tower once, for both stages
    assert manifest["training"]["pretrain"]["steps"] == 3 and manifest["training"]["finetune"]["steps"] == 3
    base, _ = load_vlm(out / "base", dtype="float32", device="cpu")
    aligned, processor = load_vlm(out / "model", dtype="float32", device="cpu")
    b, a = base.state_dict(), aligned.state_dict()
    assert set(b) == set(a)
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    assert all(not k.startswith("model.vision_tower.") for k in changed)  # the tower is frozen
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(k.startswith("model.language_model.layers.") for k in changed)  # the merged LoRA update
    assert not (out / "pretrain" / "aligned" / "adapter_config.json").exists()  # stage 1: the projector alone
    assert (out / "aligned" / "adapter_config.json").exists() and (out / "aligned" / "projector.safetensors").exists()
    assert processor.chat_template and (out / "corpus" / "corpus.json").exists()
    report = run_without_midtrain(out / "model")  # the aligned VLM loads and generates without midtrain
    assert report["class"] == "LlavaForConditionalGeneration" and report["new_tokens"] >= 1


def test_the_demo_tower_with_any_causal_lm_is_a_checkpoint_plain_transformers_loads(tiny_parts, tmp_path):
    from midtrain.align.assemble import assemble_vlm

    out = assemble_vlm(tmp_path / "vlm", "efficientnet-lite0", str(tiny_parts["lm"]), None, seed=0)
    assert json.loads((out / "config.json").read_text())["vision_config"]["model_type"] == "timm_wrapper"
    report = run_without_midtrain(out)
    assert report["class"] == "FastVlmForConditionalGeneration" and report["new_tokens"] >= 1 and not report["midtrain_loaded"]
    vlm, processor = load_vlm(out, dtype="float32", device="cpu")  # and midtrain loads it as any checkpoint
    assert vlm.model.multi_modal_projector.linear_1.in_features == 1280


def test_cached_feature_loss_equals_the_vlms_own_forward(tiny_parts, tmp_path):
    """Training on cached tower features is the VLM's own forward: same loss as pixels through LlavaForConditionalGeneration."""
    import numpy as np

    from midtrain.align.assemble import assemble_vlm
    from midtrain.align.data import FeatureCache, collate_aligned, encode_phase
    from midtrain.align.stage import AlignedVLM
    from midtrain.models.inputs import build_batch
    from midtrain.runs import stage_run
    from midtrain.sim.web import WEB_KINDS, write_web_corpus
    from midtrain.data.sources import DatasetSource
    from midtrain.align.data import read_rows

    base = assemble_vlm(tmp_path / "base", str(tiny_parts["tower"]), str(tiny_parts["lm"]), None, seed=0)
    vlm, processor = load_vlm(base, dtype="float32", device="cpu")
    write_web_corpus(tmp_path / "web", {k: 1 for k in WEB_KINDS}, image_size=32)
    src = DatasetSource(name="vqa", kind="vlm", format="llava_json", path=tmp_path / "web" / "vqa.json")
    with stage_run(tmp_path / "run", "probe", tiny_config(tiny_parts)) as st:
        rows = read_rows([src], 0, st)[:4]
        cache = FeatureCache(tmp_path / "features")
        table = encode_phase(rows, processor, vlm, cache, 128, 4, st, "encode")
    from midtrain.align.data import EncodedSamples, write_phase

    write_phase(table, tmp_path / "vqa.parquet")
    samples = EncodedSamples(tmp_path / "vqa.parquet")
    batch = collate_aligned([samples[i] for i in range(len(samples))], cache, processor.tokenizer.pad_token_id)
    cached_loss, _ = AlignedVLM(vlm)(batch)

    encoded, info = build_batch(rows, processor, answer_mask=True)
    labels = encoded["input_ids"].masked_fill(~info.answer_mask, -100)
    with torch.no_grad():
        logits = vlm(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                     pixel_values=encoded["pixel_values"]).logits  # fmt: skip
    own = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.equal(batch["input_ids"][:, : encoded["input_ids"].shape[1]], encoded["input_ids"])
    # features are cached in float16: equal up to that rounding
    assert float(cached_loss) == pytest.approx(float(own), rel=2e-3)
    assert np.isfinite(float(own)) and len(cache.index) == 4


def test_a_failed_run_resumes_with_the_finished_phases_and_cached_features(tiny_parts, tmp_path, monkeypatch):
    from midtrain.align import stage as align_stage

    run = RunDir(tmp_path / "run")
    calls = []
    real = align_stage._train_phase

    def failing_finetune(phase, *args, **kwargs):
        calls.append(phase)
        if phase == "finetune":
            raise RuntimeError("killed during stage 2")
        return real(phase, *args, **kwargs)

    monkeypatch.setattr(align_stage, "_train_phase", failing_finetune)
    with pytest.raises(RuntimeError, match="killed during stage 2"):
        run_align(tiny_config(tiny_parts), run)
    partial = tmp_path / "run" / ".partial" / "align"
    features = {p: p.stat().st_mtime_ns for p in (partial / "features").glob("part-*.npy")}
    pretrain_metrics = (partial / "pretrain" / "metrics.jsonl").read_text()
    monkeypatch.setattr(align_stage, "_train_phase", lambda phase, *a, **k: (calls.append(phase), real(phase, *a, **k))[1])
    out = run_align(tiny_config(tiny_parts), run)
    assert calls == ["pretrain", "finetune", "finetune"]  # stage 1 is not trained again
    assert {p.name: t for p, t in features.items()} == {p.name: p.stat().st_mtime_ns for p in (out / "features").glob("part-*.npy")}
    assert (out / "pretrain" / "metrics.jsonl").read_text() == pretrain_metrics
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
