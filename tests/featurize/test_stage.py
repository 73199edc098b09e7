"""The featurize stage end to end: shards, manifest, bad input, on_error, resume-by-fingerprint."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog_rows import vla_rows, vlm_rows, write_catalog
from midtrain.config import ConfigError, load_config
from midtrain.data.features import open_features
from midtrain.featurize.config import FeaturizeConfig
from midtrain.featurize.stage import featurize
from midtrain.models import ModelLoadError
from midtrain.runs import RunDir, SampleError, StageError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def catalog_rows():
    return {"llava": vlm_rows(13, seed=10), "robot": vla_rows(7, seed=11)}


def run_featurize(tmp_path, name, rows, **overrides):
    run = RunDir(tmp_path / name)
    write_catalog(run.root, rows)
    config = FeaturizeConfig(**{"shard_size": 8, "batch_size": 4, **overrides})
    config.validate()
    return run, featurize(config, run)


def all_features(out):
    fs = open_features(out)
    return np.concatenate([fs.array(n) for n in fs.names]), fs.ids()


def test_shards_manifest_and_completion(tmp_path, tiny_vlm):
    model = str(tiny_vlm("qwen2_vl"))
    run, out = run_featurize(tmp_path, "a", catalog_rows(), model=model)
    fs = open_features(out)
    assert fs.names == ["shard-00000", "shard-00001", "shard-00002"] and len(fs) == 20 and fs.dim == 64
    assert fs.array("shard-00000").dtype == np.float16
    expected_ids = [r["id"] for rows in catalog_rows().values() for r in rows]  # catalog order: llava, robot
    assert fs.ids().column("id").to_pylist() == expected_ids
    assert fs.sources() == {"llava": "vlm", "robot": "vla"}
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["dim"] == 64 and man["model"] == model
    assert (man["pooling"], man["dtype"], man["feature_dtype"]) == ("mean", "float32", "float16")
    assert man["include_assistant"] is True and man["max_length"] == 4096
    assert man["processor"]["processor_class"] == "Qwen2VLProcessor"
    assert man["processor"]["image_processor"]["size"] == {"longest_edge": 56 * 56, "shortest_edge": 28 * 28}
    assert man["counts"]["read"] == man["counts"]["written"] == 20 and man["counts"]["truncated"] == 0
    assert man["counts"]["tokens"] > 0 and man["throughput"]["samples_per_s"] > 0
    # same config and inputs: the stage is complete and is not recomputed
    mtime = (out / "shards" / "shard-00000.npy").stat().st_mtime_ns
    featurize(FeaturizeConfig(model=model, shard_size=8, batch_size=4), run)
    assert (out / "shards" / "shard-00000.npy").stat().st_mtime_ns == mtime

    # preparation in this process equals a DataLoader worker (the CPU default) bit for bit;
    # other batch sizes and interleaved shards from 2 workers agree to float16 rounding
    feats, _ = all_features(out)
    _, out0 = run_featurize(tmp_path, "b", catalog_rows(), model=model, num_workers=0)
    np.testing.assert_array_equal(all_features(out0)[0], feats)
    _, out1 = run_featurize(tmp_path, "c", catalog_rows(), model=model, num_workers=2, batch_size=1, shard_size=5)
    np.testing.assert_allclose(all_features(out1)[0].astype(np.float32), feats.astype(np.float32), atol=2e-3, rtol=2e-3)


def with_bad_rows():
    rows = catalog_rows()
    rows["llava"][2]["image_refs"] = [{"path": None, "bytes": b"\x89PNG broken"}]
    rows["robot"][3]["image_refs"] = [{"path": "/nonexistent/frame.png", "bytes": None}]
    return rows


def test_bad_images_are_skipped_with_reasons_or_raise(tmp_path, tiny_vlm):
    model = str(tiny_vlm("qwen2_vl"))
    _, out = run_featurize(tmp_path, "skip", with_bad_rows(), model=model, on_error="skip")
    feats, ids = all_features(out)
    assert len(ids) == 18 and "llava/2" not in ids.column("id").to_pylist() and np.isfinite(feats).all()
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {(e["id"], e["reason"], e["where"], e["shard"]) for e in errors} == {
        ("llava/2", "undecodable image", "llava.json:3", "shard-00000"),
        ("robot/0/3", "missing image file", "episode 0 frame 3", "shard-00002"),
    }
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["skipped"] == {"undecodable image": 1, "missing image file": 1}
    assert man["counts"]["read"] == 20 and man["counts"]["written"] == 18
    with pytest.raises(SampleError, match=r"llava\.json:3: undecodable image"):
        run_featurize(tmp_path, "raise", with_bad_rows(), model=model)


def test_over_long_samples_truncate_or_skip(tmp_path, tiny_vlm):
    model = str(tiny_vlm("qwen2_vl"))
    _, out = run_featurize(tmp_path, "trunc", catalog_rows(), model=model, max_length=48)
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["truncated"] > 0 and man["counts"]["written"] == 20
    _, out = run_featurize(tmp_path, "skip", catalog_rows(), model=model, max_length=48, overlong="skip", on_error="skip")
    man = json.loads((out / "manifest.json").read_text())
    skipped = man["counts"]["skipped"]["over-long sample"]
    assert skipped == 20 - man["counts"]["written"] > 0 and man["counts"]["truncated"] == 0


def test_image_pooling_skips_text_only_samples(tmp_path, tiny_vlm):
    _, out = run_featurize(tmp_path, "img", catalog_rows(), model=str(tiny_vlm("idefics3")), pooling="image_mean",
                           on_error="skip")  # fmt: skip
    man = json.loads((out / "manifest.json").read_text())
    text_only = [r["id"] for r in catalog_rows()["llava"] if not r["image_refs"]]
    assert man["counts"]["skipped"] == {"nothing to pool": len(text_only)} and man["pooling"] == "image_mean"
    assert set(text_only).isdisjoint(all_features(out)[1].column("id").to_pylist())


@pytest.mark.slow
def test_compile_option_gives_the_eager_features_and_records_its_time(tmp_path, tiny_vlm):
    model = str(tiny_vlm("qwen2_vl"))
    rows = {"robot": vla_rows(6, seed=12)}
    _, eager = run_featurize(tmp_path, "eager", rows, model=model, num_workers=0)
    _, compiled = run_featurize(tmp_path, "compiled", rows, model=model, num_workers=0, compile=True)
    np.testing.assert_array_equal(all_features(compiled)[0], all_features(eager)[0])  # same float16 shards
    man = json.loads((compiled / "manifest.json").read_text())
    assert man["compile"] is True and man["compile_s"] > 0
    assert json.loads((eager / "manifest.json").read_text())["compile"] is False


def test_nan_feature_raises_naming_the_sample(tmp_path, tiny_vlm):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    src = tiny_vlm("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(src)
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(float("nan"))
    broken = tmp_path / "broken-vlm"
    model.save_pretrained(broken)
    AutoProcessor.from_pretrained(src).save_pretrained(broken)
    with pytest.raises(StageError, match=r"non-finite feature \(NaN/inf\) for sample '(llava|robot)/"):
        run_featurize(tmp_path, "nan", catalog_rows(), model=str(broken), on_error="skip")
    assert not list((tmp_path / "nan" / "featurize" / "shards").glob("*.done"))


def test_config_and_model_errors(tmp_path, tiny_vlm):
    with pytest.raises(ConfigError, match="model: required"):
        load_config(FeaturizeConfig, None, [])
    with pytest.raises(ConfigError, match="pooling: expected"):
        load_config(FeaturizeConfig, None, ["model=x", "pooling=max"])
    with pytest.raises(ConfigError, match="shard_size: must be >= 1"):
        load_config(FeaturizeConfig, None, ["model=x", "shard_size=0"])
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                         vocab_size=40)).save_pretrained(tmp_path / "bert")  # fmt: skip
    with pytest.raises(ModelLoadError, match="'bert' model, not a vision-language model"):
        run_featurize(tmp_path, "bert", catalog_rows(), model=str(tmp_path / "bert"))
    with pytest.raises(StageError, match="stage 'catalog' has not completed"):
        featurize(FeaturizeConfig(model=str(tiny_vlm("qwen2_vl"))), RunDir(tmp_path / "empty"))


def test_ids_parquet_is_readable_without_midtrain(tmp_path, tiny_vlm):
    _, out = run_featurize(tmp_path, "plain", {"robot": vla_rows(5)}, model=str(tiny_vlm("qwen2_vl")))
    table = pq.read_table(out / "shards" / "shard-00000.ids.parquet")
    assert table.column_names == ["id", "source", "kind"] and table.num_rows == 5
    assert np.load(out / "shards" / "shard-00000.npy", mmap_mode="r").shape == (5, 64)
