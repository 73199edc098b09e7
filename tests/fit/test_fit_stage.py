"""``midtrain fit``: artefacts, manifest metrics, skip-when-complete, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from run_fixtures import FakeFeaturizeConfig, gaussian_features, write_features

from midtrain.cli import main as cli_main
from midtrain.config import ConfigError, load_config
from midtrain.runs import RunDir, SampleError, StageError
from midtrain.fit.estimator import load_estimator
from midtrain.fit.config import FitConfig
from midtrain.fit.stage import fit_estimator

FAST = dict(max_epochs=8)


def test_fit_writes_a_standalone_estimator_and_metrics(synthetic_run):
    out = fit_estimator(FitConfig(**FAST), synthetic_run)
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert 0.8 < man["val_auc"] <= 1.0 and 0.5 < man["val_accuracy"] <= 1.0
    assert len(man["curve"]) == man["epochs_run"] and {"train_loss", "val_loss", "val_accuracy", "val_auc"} <= set(man["curve"][0])
    assert man["counts"]["positives"] == 200 and man["counts"]["negatives"] == 400
    feat_fp = synthetic_run.manifest("featurize")["fingerprint"]
    cfg = json.loads((out / "estimator" / "config.json").read_text())
    assert cfg["feature_fingerprint"] == feat_fp and cfg["dim"] == 16 and cfg["kind"] == "linear"
    assert cfg["vla_sources"] == ["robot"] and cfg["pool_sources"] == ["far", "near"]
    model = load_estimator(out / "estimator")
    assert model.dim == 16
    # complete + same config => skipped; --force recomputes
    mtime = (out / "estimator" / "model.safetensors").stat().st_mtime_ns
    fit_estimator(FitConfig(**FAST), synthetic_run)
    assert (out / "estimator" / "model.safetensors").stat().st_mtime_ns == mtime
    fit_estimator(FitConfig(**FAST), synthetic_run, force=True)
    assert (out / "estimator" / "model.safetensors").stat().st_mtime_ns != mtime


def test_fit_through_the_cli_with_an_mlp_and_overrides(synthetic_run, tmp_path):
    cfg = tmp_path / "fit.yaml"
    cfg.write_text("model: mlp\nhidden: [8]\nmax_epochs: 3\n")
    assert cli_main(["fit", "--config", str(cfg), "--run-dir", str(synthetic_run.root), "batch_size=32"]) == 0
    man = synthetic_run.manifest("fit")
    assert man["config"]["model"] == "mlp" and man["config"]["batch_size"] == 32 and man["epochs_run"] <= 3


def test_empty_vla_set_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path / "run")
    near, far, _ = gaussian_features(20, 20, 0, 8)
    write_features(run, [("near", "vlm", near), ("far", "vlm", far)])
    with pytest.raises(StageError, match=r"VLA \(kind 'vla'\) set is empty.*near \(vlm\)"):
        fit_estimator(FitConfig(**FAST), run)


def test_unknown_or_wrong_kind_sources_are_named(synthetic_run):
    with pytest.raises(StageError, match=r"source 'robots' is not in the feature run; known vla sources: robot"):
        fit_estimator(FitConfig(vla_sources=["robots"], **FAST), synthetic_run)
    with pytest.raises(StageError, match=r"source 'near' has kind 'vlm', not 'vla'"):
        fit_estimator(FitConfig(vla_sources=["near"], **FAST), synthetic_run)


def test_nan_features_name_the_shard_row_and_id_or_are_skipped(tmp_path):
    run = RunDir(tmp_path / "run")
    near, far, vla = gaussian_features(30, 30, 30, 8)
    far[5, 3] = np.nan
    vla[2, 0] = np.inf
    write_features(run, [("near", "vlm", near), ("far", "vlm", far), ("robot", "vla", vla)], shard_rows=40,
                   config=FakeFeaturizeConfig(dim=8))  # fmt: skip
    with pytest.raises(SampleError, match=r"shard-0000\d\.npy row \d+: non-finite feature values") as exc:
        fit_estimator(FitConfig(**FAST), run)
    assert exc.value.sample_id in ("robot/2", "far/5")
    out = fit_estimator(FitConfig(on_error="skip", **FAST), run)
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["skipped"] == {"non-finite feature values": 2}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["far/5", "robot/2"]
    assert man["counts"]["positives"] == 29 and man["counts"]["negatives"] == 59


def test_fit_needs_the_featurize_stage(tmp_path):
    with pytest.raises(StageError, match="stage 'featurize' has not completed"):
        fit_estimator(FitConfig(), RunDir(tmp_path / "empty"))


@pytest.mark.parametrize(
    "override, key",
    [("val_fraction=0", "val_fraction"), ("batch_size=1", "batch_size"), ("target_val_accuracy=1.5", "target_val_accuracy"),
     ("model=svm", "model"), ("max_negatives=1", "max_negatives")],
)  # fmt: skip
def test_bad_fit_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(FitConfig, None, [override])
