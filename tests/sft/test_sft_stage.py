"""``midtrain sft`` end to end on tiny models: LoRA checkpoints hold only the adapter and the merged
model is the adapted one; frozen parts stay as they were; the drawn composition; bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from catalog_rows import vlm_rows
from safetensors.torch import load_file

from midtrain.models import load_vlm
from midtrain.runs import RunDir, SampleError, StageError
from midtrain.sft.config import SFTConfig
from midtrain.sft.stage import run_sft
from midtrain.train import read_metrics

FAST = {"steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 0,
        "save_every": 3, "log_every": 1, "num_workers": 0}  # fmt: skip


def sft(run, model, **kw) -> tuple:
    train = {**FAST, **kw.pop("train", {})}
    config = SFTConfig(model=str(model), train=train, **{"sources": ["llava", "spatial"], "val_fraction": 0.1, **kw})
    out = run_sft(config, run)
    return out, json.loads((out / "manifest.json").read_text())


def logits(model, processor, rows):
    from midtrain.sft.data import collate_sft

    batch = collate_sft(rows, processor, 4096, "truncate")
    inputs = {k: v for k, v in batch.items() if hasattr(v, "shape") and k != "labels"}
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_lora_checkpoints_hold_the_adapter_and_the_merged_model_gives_the_adapted_logits(catalog_run, tiny_vlm):
    from peft import PeftModel

    base = tiny_vlm("qwen2_vl")
    out, man = sft(catalog_run, base, mode="lora", vision="last_fraction", train_projector=True, lora={"rank": 4, "alpha": 16})
    ckpt = out / "checkpoints" / "step-000006"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state"} <= files and "model.safetensors" not in files
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert any(".lora_A." in k for k in adapter) and any("visual.blocks.1." in k for k in adapter)
    assert any("visual.merger." in k for k in adapter) and not any("visual.blocks.0." in k for k in adapter)
    counts = man["parameters"]
    assert 0 < counts["vision_tower"]["trainable"] < counts["vision_tower"]["total"]  # the last of two blocks
    assert man["train"]["steps"] == 6 and man["final_model"].endswith("/model")

    merged, processor = load_vlm(out / "model", dtype="float32", device="cpu")  # an ordinary checkpoint
    adapted, _ = load_vlm(base, dtype="float32", device="cpu")
    adapted = PeftModel.from_pretrained(adapted, ckpt).eval()
    rows = [r for r in vlm_rows(6) if r["image_refs"]][:3]
    torch.testing.assert_close(logits(merged, processor, rows), logits(adapted, processor, rows), rtol=1e-4, atol=1e-4)
    original, _ = load_vlm(base, dtype="float32", device="cpu")
    before, after = original.state_dict(), merged.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.visual.blocks.1.") for k in changed) and any("merger" in k for k in changed)
    assert not any(k.startswith(("model.visual.blocks.0.", "model.visual.patch_embed")) for k in changed)
    assert any(".self_attn.q_proj." in k for k in changed)  # LoRA merged into the language model


def test_full_fine_tuning_leaves_frozen_parts_unchanged_and_a_finished_run_is_skipped(catalog_run, tiny_vlm):
    base = tiny_vlm("idefics3")
    out, man = sft(catalog_run, base, mode="full", vision="frozen", train_projector=False)
    original, _ = load_vlm(base, dtype="float32", device="cpu")
    tuned, _ = load_vlm(out / "model", dtype="float32", device="cpu")
    before, after = original.state_dict(), tuned.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("model.vision_model.", "model.connector.")):
            assert same, k
    assert not torch.equal(before["model.text_model.layers.0.mlp.down_proj.weight"], after["model.text_model.layers.0.mlp.down_proj.weight"])
    assert man["parameters"]["vision_tower"]["trainable"] == man["parameters"]["projector"]["trainable"] == 0
    assert man["parameters"]["language_model"]["trainable"] == man["parameters"]["language_model"]["total"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (out / "loss_curves.png").stat().st_size > 1000 and (out / "composition.png").is_file()
    assert json.loads((out / "model" / "midtrain_sft.json").read_text())["mode"] == "full"
    stamp = (out / "manifest.json").stat().st_mtime_ns
    out2, _ = sft(catalog_run, base, mode="full", vision="frozen", train_projector=False)
    assert out2 == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # skipped as complete


def test_a_fixed_budget_draws_the_composition_by_seed(catalog_run, tiny_vlm):
    base = tiny_vlm("qwen2_vl")
    mix = {"weights": {"llava": 3, "spatial": 1}, "budget": 20}
    out, man = sft(catalog_run, base, mixture=mix, train={"steps": 1, "eval_every": 0}, val_fraction=0.2)
    comp = json.loads((out / "composition.json").read_text())
    assert comp == man["composition"]
    per = comp["sources"]
    assert (per["llava"]["train_samples"], per["spatial"]["train_samples"]) == (15, 5)
    assert (per["llava"]["val_samples"], per["spatial"]["val_samples"]) == (3, 1)
    assert per["llava"]["weight"] == 0.75 and comp["train_samples"] == 20
    samples = pq.read_table(out / "data" / "samples.parquet").to_pylist()
    train_ids = {r["id"] for r in samples if r["split"] == "train"}
    assert len(train_ids) == 20 and not train_ids & {r["id"] for r in samples if r["split"] == "val"}
    again = RunDir(catalog_run.root.parent / "again")
    shutil.copytree(catalog_run.root / "catalog", again.root / "catalog")
    other = RunDir(catalog_run.root.parent / "other")
    shutil.copytree(catalog_run.root / "catalog", other.root / "catalog")
    out_a, _ = sft(again, base, mixture=mix, train={"steps": 1, "eval_every": 0}, val_fraction=0.2)
    out_o, _ = sft(other, base, mixture=mix, train={"steps": 1, "eval_every": 0}, val_fraction=0.2, seed=1)
    ids = lambda d: [r["id"] for r in pq.read_table(d / "data" / "samples.parquet").to_pylist()]  # noqa: E731
    assert ids(out_a) == ids(out) and ids(out_o) != ids(out)
    # a token budget: each source's training tokens reach its share, overshooting by less than one sample
    tok = RunDir(catalog_run.root.parent / "tokens")
    shutil.copytree(catalog_run.root / "catalog", tok.root / "catalog")
    out_t, _ = sft(tok, base, mixture={"weights": {"llava": 1, "spatial": 1}, "budget": 1500, "unit": "tokens"},
                   train={"steps": 1, "eval_every": 0})  # fmt: skip
    for s, c in json.loads((out_t / "composition.json").read_text())["sources"].items():
        longest = max(r["length"] for r in pq.read_table(out_t / "data" / "samples.parquet").to_pylist() if r["source"] == s)
        assert 750 <= c["train_tokens"] < 750 + longest


def test_bad_input_is_truncated_skipped_or_named(tmp_path, tiny_vlm):
    from catalog_rows import write_catalog

    base = tiny_vlm("qwen2_vl")
    rows = vlm_rows(24)
    rows[1]["messages"][0]["content"] += " describe it in detail" * 60  # a long prompt: its answer is cut away
    rows[2]["messages"][1]["content"] = "yes " * 60  # a long answer: truncated, some answer left
    rows[3]["image_refs"] = [{"path": str(tmp_path / "gone.png"), "bytes": None}]
    run = RunDir(tmp_path / "run")
    write_catalog(run.root, {"llava": rows})
    with pytest.raises(SampleError, match=r"llava.json:4: missing image file"):
        sft(run, base, sources=["llava"], max_length=160)
    out, man = sft(run, base, sources=["llava"], max_length=160, on_error="skip", train={"steps": 1})
    assert man["counts"]["skipped"] == {"no answer tokens": 1, "missing image file": 1}
    assert man["counts"]["truncated"] == 1 and man["counts"]["train_samples"] + man["counts"]["val_samples"] == 22
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"]: e["reason"] for e in errors} == {"llava/1": "no answer tokens", "llava/3": "missing image file"}
    assert "truncated away by max_length 160" in next(e["detail"] for e in errors if e["id"] == "llava/1")
    run2 = RunDir(tmp_path / "run2")
    write_catalog(run2.root, {"llava": rows[:1] + rows[2:3] + rows[4:]})
    out, man = sft(run2, base, sources=["llava"], max_length=160, overlong="skip", on_error="skip", train={"steps": 1})
    assert man["counts"]["skipped"] == {"over-long sample": 1} and man["counts"]["truncated"] == 0


def test_unusable_models_and_inputs_fail_before_training_in_one_line(catalog_run, tiny_vlm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_vlm("qwen2_vl")
    no_template = tmp_path / "no_template"
    shutil.copytree(base, no_template)
    (no_template / "chat_template.jinja").unlink()
    with pytest.raises(StageError, match="processor has no chat template") as err:
        sft(catalog_run, no_template)
    assert "\n" not in str(err.value) and not (catalog_run.root / "sft" / "checkpoints").exists()
    text_only = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(text_only)  # fmt: skip
    with pytest.raises(StageError, match="not a vision-language model"):
        sft(catalog_run, text_only)
    with pytest.raises(StageError, match="'robot' holds VLA frames.*vla_as_text: true"):
        sft(catalog_run, base, sources=["robot"])
    with pytest.raises(StageError, match="'nope' is not a source of the catalog"):
        sft(catalog_run, base, sources=["nope"])
    with pytest.raises(StageError, match="mixture.weights: 'nope' is not an input source"):
        sft(catalog_run, base, mixture={"weights": {"nope": 1}, "budget": 4})


def test_trains_on_the_export_mixture_and_on_llava_json_directly(tmp_path, tiny_vlm):
    from midtrain.config import StageConfig
    from midtrain.data.catalog import rows_to_table
    from midtrain.data.images import encode_image
    from midtrain.runs import stage_run, write_parquet_atomic

    base = tiny_vlm("smolvlm")
    run = RunDir(tmp_path / "run")
    with stage_run(run, "export", StageConfig(), kind="export") as st:  # the export stage's artefact
        write_parquet_atomic(st.dir / "mixture.parquet", rows_to_table(vlm_rows(12, "a") + vlm_rows(12, "b", seed=2)))
    out, man = sft(run, base, sources=[], train={"steps": 2})
    assert set(man["composition"]["sources"]) == {"a", "b"} and man["counts"]["train_samples"] == 22
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(10):
        (images / f"{i}.png").write_bytes(encode_image(np.full((40, 50, 3), 20 * i, np.uint8)))
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": f"Gray level {20 * i}."}]})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    run2 = RunDir(tmp_path / "run2")
    dataset = {"name": "mine", "kind": "vlm", "format": "llava_json", "path": str(tmp_path / "llava.json"), "image_root": str(images)}
    out, man = sft(run2, base, sources=[], datasets=[dataset], train={"steps": 2})
    assert man["counts"]["train_samples"] == 9 and man["composition"]["sources"]["mine"]["val_samples"] == 1
