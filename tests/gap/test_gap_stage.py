"""``midtrain gap`` end to end on synthetic feature shards: outputs, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from gap_fixtures import DIM, SOURCES, single_torch_thread, write_features  # noqa: F401 (autouse fixture)
from PIL import Image
from scipy.spatial.distance import pdist

from midtrain.cli import run_stage
from midtrain.config import ConfigError, load_config
from midtrain.data.features import shard_name, write_feature_shard
from midtrain.gap.mmd import mmd_matrix
from midtrain.gap.config import GapConfig
from midtrain.gap.stage import measure_gap
from midtrain.gap.tsne import stratified_quota
from midtrain.runs import RunDir, SampleError, StageError

FAST = dict(
    subsample=100, permutations=50, tsne_max_points=300, tsne_iterations=60, n_jobs=1, bandwidth_factors=[0.5, 1.0, 2.0]
)


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    return write_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def gap_run(features_dir, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("run"))
    out = measure_gap(GapConfig(features=features_dir, **FAST), run)
    return run, out


def test_outputs_and_manifest(gap_run):
    run, out = gap_run
    names = ["caption_web", "chart_qa", "spatial_vqa", "robot_a", "robot_b"]  # VLM first, then VLA, sorted
    table = pq.read_table(out / "mmd.parquet")
    assert table.column_names == [
        "source_a",
        "source_b",
        "kind_a",
        "kind_b",
        "mmd2_unbiased",
        "mmd2_biased",
        "mmd",
        "p_value",
        "n_a",
        "n_b",
    ]
    assert table.num_rows == len(names) * (len(names) - 1) // 2
    rows = table.to_pylist()
    assert {(r["source_a"], r["source_b"]) for r in rows} == {
        (a, b) for i, a in enumerate(names) for b in names[i + 1 :]
    }
    assert all(r["n_a"] == r["n_b"] == 100 for r in rows)
    assert all(r["kind_a"] == SOURCES[r["source_a"]][0] for r in rows)
    assert all(r["mmd"] == pytest.approx(np.sqrt(max(r["mmd2_unbiased"], 0.0))) for r in rows)

    matrix = json.loads((out / "mmd.json").read_text())
    manifest = run.manifest("gap")
    assert matrix["sources"] == names
    assert matrix["sigma"] == manifest["sigma"] > 0
    assert matrix["sigmas"] == pytest.approx([0.5 * matrix["sigma"], matrix["sigma"], 2 * matrix["sigma"]])
    assert "max off-diagonal" in matrix["normalisation"]
    norm = np.array(matrix["normalised_mmd"])
    assert norm.max() == pytest.approx(1.0) and np.allclose(norm, norm.T) and np.all(np.diag(norm) == 0)
    assert manifest["n_per_dataset"] == dict.fromkeys(names, 100)
    assert manifest["estimator"] == "unbiased" and manifest["permutations"] == 50
    assert manifest["counts"]["read"] == 500 and manifest["counts"]["written"] == 10
    assert {"load", "bandwidth", "mmd", "tsne"} <= set(manifest["timings"])
    for png in ("mmd_heatmap.png", "tsne.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and img.size[0] > 400


def test_values_match_a_direct_computation(features_dir, tmp_path):
    """With subsamples covering every dataset, the stage's numbers are mmd_matrix on the stored features,
    with sigma the median pairwise distance of the pooled features."""
    from midtrain.data.features import open_features

    cfg = GapConfig(features=features_dir, subsample=1000, median_sample_size=1000, permutations=20, tsne=False)
    out = measure_gap(cfg, RunDir(tmp_path))
    matrix = json.loads((out / "mmd.json").read_text())
    fs = open_features(features_dir)
    data = {s: fs.take(fs.rows_of(source=s)) for s in matrix["sources"]}
    assert matrix["n"] == [len(v) for v in data.values()] == [SOURCES[s][2] for s in matrix["sources"]]
    assert matrix["sigma"] == pytest.approx(np.median(pdist(np.concatenate(list(data.values())))), rel=1e-6)
    direct = mmd_matrix(data, [matrix["sigma"]], permutations=20)
    np.testing.assert_allclose(matrix["mmd2_unbiased"], direct.mmd2_unbiased, atol=1e-7)
    np.testing.assert_allclose(matrix["mmd2_biased"], direct.mmd2_biased, atol=1e-7)
    np.testing.assert_array_equal(matrix["p_values"], direct.p_values)


def test_p_values_separate_clouds(gap_run):
    _, out = gap_run
    p = {(r["source_a"], r["source_b"]): r["p_value"] for r in pq.read_table(out / "mmd.parquet").to_pylist()}
    assert p["caption_web", "robot_a"] == pytest.approx(1 / 51)  # clearly different clouds
    assert p["robot_a", "robot_b"] > 0.05  # shifts 1.2 vs 1.3 with 100 points: not detectable


def test_summary_ranks_vlm_sources_by_distance_to_vla(gap_run):
    _, out = gap_run
    summary = json.loads((out / "summary.json").read_text())
    ranking = summary["vlm_ranking"]
    assert [r["source"] for r in ranking] == ["spatial_vqa", "caption_web", "chart_qa"]  # by mean shift distance
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert all(r["closest_vla_source"] in ("robot_a", "robot_b") for r in ranking)
    assert ranking[0]["mean_mmd_to_vla"] < ranking[1]["mean_mmd_to_vla"] < ranking[2]["mean_mmd_to_vla"]
    assert summary["mean_mmd_cross"] > summary["mean_mmd_within_vlm"] > summary["mean_mmd_within_vla"]
    assert summary["pairs_within_vlm"] == 3 and summary["pairs_within_vla"] == 1 and summary["pairs_cross"] == 6
    assert summary["groups"] == {"vlm": ["caption_web", "chart_qa", "spatial_vqa"], "vla": ["robot_a", "robot_b"]}
    table = {(r["source_a"], r["source_b"]): r["mmd"] for r in pq.read_table(out / "mmd.parquet").to_pylist()}
    expected = np.mean([table["spatial_vqa", "robot_a"], table["spatial_vqa", "robot_b"]])
    assert ranking[0]["mean_mmd_to_vla"] == pytest.approx(expected)


def test_tsne_map_is_stratified_and_keeps_ids(gap_run):
    _, out = gap_run
    coords = pq.read_table(out / "tsne.parquet")
    assert coords.column_names == ["id", "source", "kind", "x", "y"]
    assert coords.num_rows == 300
    counts = {s: coords.column("source").to_pylist().count(s) for s in SOURCES}
    assert counts == dict.fromkeys(SOURCES, 60)  # 300 points over 5 sources, each has more than 60
    rows = coords.to_pylist()
    assert all(r["id"].startswith(r["source"] + "-") for r in rows)  # ids travel with their features
    assert len({r["id"] for r in rows}) == 300
    xy = np.array([[r["x"], r["y"]] for r in rows])
    assert np.isfinite(xy).all() and xy.std(0).min() > 0


def test_complete_stage_is_skipped_and_config_change_reruns(gap_run, features_dir):
    run, out = gap_run
    before = (out / "mmd.json").stat().st_mtime_ns
    measure_gap(GapConfig(features=features_dir, **FAST), run)
    assert (out / "mmd.json").stat().st_mtime_ns == before
    other = RunDir(run.root.parent / (run.root.name + "-other"))
    cfg = GapConfig(features=features_dir, **{**FAST, "tsne": False, "permutations": 0, "sigma": 4.0})
    out2 = measure_gap(cfg, other)
    table = pq.read_table(out2 / "mmd.parquet")
    assert table.column("p_value").null_count == table.num_rows
    assert json.loads((out2 / "mmd.json").read_text())["sigma"] == 4.0
    assert not (out2 / "tsne.png").exists()


def test_subsample_is_seeded(features_dir, tmp_path):
    cfg = dict(features=features_dir, subsample=50, permutations=0, tsne=False)
    a = measure_gap(GapConfig(**cfg), RunDir(tmp_path / "a"))
    b = measure_gap(GapConfig(**cfg), RunDir(tmp_path / "b"))
    c = measure_gap(GapConfig(**cfg, seed=1), RunDir(tmp_path / "c"))
    read = lambda d: json.loads((d / "mmd.json").read_text())["mmd2_unbiased"]  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_rff_method_and_source_selection(features_dir, tmp_path):
    cfg = GapConfig(
        features=features_dir,
        method="rff",
        rff_features=512,
        permutations=20,
        tsne=False,
        sources=["robot_b", "caption_web", "spatial_vqa"],
    )
    out = measure_gap(cfg, RunDir(tmp_path))
    matrix = json.loads((out / "mmd.json").read_text())
    assert matrix["sources"] == ["caption_web", "spatial_vqa", "robot_b"]
    assert matrix["method"] == "rff(512)"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_mmd_within_vla"] is None and summary["pairs_within_vla"] == 0
    assert [r["source"] for r in summary["vlm_ranking"]] == ["spatial_vqa", "caption_web"]


def test_reads_featurize_output_of_the_run_and_cli_overrides(tmp_path):
    from midtrain.runs import stage_run

    run = RunDir(tmp_path / "run")
    with pytest.raises(StageError, match="stage 'featurize' has not completed.*midtrain featurize"):
        measure_gap(GapConfig(), run)
    with stage_run(run, "featurize", GapConfig(), kind="featurize") as st:  # any config: only a complete manifest is required
        write_features(st.dir)
        st.extra["dim"] = DIM
    out = run_stage("gap", run.root, None, ["subsample=40", "permutations=10", "tsne=false", "estimator=biased"])
    matrix = json.loads((out / "mmd.json").read_text())
    assert matrix["estimator"] == "biased" and matrix["n"] == [40] * 5
    np.testing.assert_allclose(matrix["mmd"], np.sqrt(np.clip(matrix["mmd2_biased"], 0, None)))


# --------------------------------------------------------------------------- bad input


def test_dataset_with_one_sample_is_named(tmp_path):
    sources = {**SOURCES, "lonely": ("vlm", 0.0, 1)}
    features = write_features(tmp_path / "f", sources)
    with pytest.raises(StageError, match="dataset 'lonely' has 1 sample"):
        measure_gap(GapConfig(features=features, tsne=False), RunDir(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / ".partial" / "gap" / "manifest.json").read_text())["status"] == "failed"


def test_mismatched_feature_dimension_names_the_datasets(tmp_path):
    import pyarrow as pa

    features = write_features(tmp_path / "f")
    ids = pa.table({"id": ["odd-0", "odd-1"], "source": ["odd_source", "odd_source"], "kind": ["vlm", "vlm"]})
    write_feature_shard(features / "shards", shard_name(99), np.zeros((2, DIM + 3), np.float32), ids)
    with pytest.raises(StageError, match=r"shard-00099.npy: feature dimension 19 differs from 16.*odd_source"):
        measure_gap(GapConfig(features=features, tsne=False), RunDir(tmp_path / "run"))


def _nan_features(tmp_path):
    def poison(x, ids):
        for i, sample_id in enumerate(ids):
            if sample_id in ("robot_a-3", "robot_a-7"):
                x[i, 2] = np.nan

    return write_features(tmp_path / "f", mutate=poison)


def test_nan_features_raise_naming_the_dataset_and_row(tmp_path):
    features = _nan_features(tmp_path)
    with pytest.raises(SampleError, match=r"shard-\d+\.npy row \d+: non-finite features \(dataset 'robot_a'"):
        measure_gap(GapConfig(features=features, subsample=200, tsne=False), RunDir(tmp_path / "run"))


def test_nan_features_are_skipped_and_recorded_with_on_error_skip(tmp_path):
    features = _nan_features(tmp_path)
    run = RunDir(tmp_path / "run")
    out = measure_gap(
        GapConfig(
            features=features,
            subsample=200,
            permutations=10,
            tsne_max_points=1000,
            tsne_iterations=20,
            n_jobs=1,
            on_error="skip",
        ),
        run,
    )
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["robot_a-3", "robot_a-7"]  # once each, though read twice
    assert all(e["reason"] == "non-finite features" and "robot_a" in e["detail"] for e in errors)
    manifest = run.manifest("gap")
    assert manifest["counts"]["skipped"] == {"non-finite features": 2}
    assert manifest["n_per_dataset"]["robot_a"] == 138
    assert "robot_a-3" not in pq.read_table(out / "tsne.parquet").column("id").to_pylist()


def test_unknown_source_and_missing_features_dir(tmp_path, features_dir):
    with pytest.raises(StageError, match="sources: nope not in .*available: caption_web"):
        measure_gap(GapConfig(features=features_dir, sources=["nope", "robot_a"]), RunDir(tmp_path / "a"))
    with pytest.raises(StageError, match="input not found|not a features directory"):
        measure_gap(GapConfig(features=tmp_path / "missing"), RunDir(tmp_path / "b"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("subsample=1", "subsample"),
        ("sigma=-1", "sigma"),
        ("bandwidth_factors=[]", "bandwidth_factors"),
        ("permutations=-5", "permutations"),
        ("device=tpu", "device"),
        ("method=linear", "method"),
        ("alpha=1.5", "alpha"),
        ("tsne_iterations=0", "tsne_iterations"),
    ],
)
def test_bad_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(GapConfig, None, [override])


def test_stratified_quota():
    assert stratified_quota([10, 1000, 1000], 300) == [10, 145, 145]
    assert stratified_quota([5, 7], 100) == [5, 7]
    assert stratified_quota([50, 50, 50], 90) == [30, 30, 30]
    assert sum(stratified_quota([3, 400, 17, 900], 500)) <= 500
