"""``midtrain score``: every pool sample scored once, streaming, baselines, resume, bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from run_fixtures import FakeFeaturizeConfig, build_run, gaussian_features, write_features

from midtrain.config import ConfigError, load_config
from midtrain.data.features import open_features
from midtrain.runs import RunDir, SampleError, StageError
from midtrain.fit.estimator import ProximityEstimator, load_estimator
from midtrain.fit.config import FitConfig
from midtrain.fit.stage import fit_estimator
from midtrain.data.features import stream_feature_chunks
from midtrain.score.config import ScoreConfig
from midtrain.score.stage import score_feature_shard, score_pool
from midtrain.score.scorers import MeanDistanceScorer, ProximityScorer, RandomScorer


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    """A synthetic run with a fitted linear estimator (built once for this module)."""
    run = build_run(tmp_path_factory.mktemp("fitted"))
    fit_estimator(FitConfig(max_epochs=8), run)
    return run


def copy_run(run: RunDir, tmp_path) -> RunDir:
    dst = tmp_path / "copy"
    shutil.copytree(run.root, dst)
    return RunDir(dst)


def test_every_pool_sample_is_scored_once_with_the_estimator(fitted_run, tmp_path):
    run = copy_run(fitted_run, tmp_path)
    out = score_pool(ScoreConfig(chunk_rows=7), run)  # a chunk size that does not divide the shards
    table = pq.read_table(out / "proximity_scores.parquet")
    assert table.column_names == ["id", "source", "score", "logit"]
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 400 and set(table.column("source").to_pylist()) == {"near", "far"}
    # scores equal the saved estimator applied to the raw features (standardiser folded in)
    fs = open_features(run.stage_dir("featurize"))
    all_ids = fs.ids().column("id").to_pylist()
    x = fs.take(np.array([all_ids.index(i) for i in ids]))
    model = load_estimator(run.stage_dir("fit") / "estimator")
    np.testing.assert_allclose(table.column("score").to_numpy(), model.score(x), rtol=1e-5, atol=1e-6)
    man = run.manifest("score")
    assert man["scorer"] == "proximity" and man["order_column"] == "logit" and man["pool_rows"] == 400
    assert man["feature_fingerprint"] == run.manifest("featurize")["fingerprint"]
    # the learned score prefers the source closer to the VLA data
    by_source = {s: table.filter(pc.equal(table.column("source"), s)).column("score").to_numpy().mean() for s in ("near", "far")}
    assert by_source["near"] > by_source["far"]


def test_stream_feature_chunks_covers_every_row_in_order(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 5)).astype(np.float16)
    np.save(tmp_path / "a.npy", x)
    got = list(stream_feature_chunks(tmp_path / "a.npy", chunk_rows=333, release_every=4096))
    assert [s for s, _ in got] == [0, 333, 666, 999]
    np.testing.assert_array_equal(np.concatenate([np.array(c) for _, c in got]), x)


def test_score_resumes_at_shard_granularity(fitted_run, tmp_path):
    run = copy_run(fitted_run, tmp_path)
    out = score_pool(ScoreConfig(), run)
    first = pq.read_table(out / "proximity_scores.parquet")
    parts = sorted((out / "shards").glob("*.parquet"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    # simulate a crash after all shards but one: the run's partial folder, manifest 'running', one shard unfinished
    partial = run.root / ".partial" / "score"
    partial.parent.mkdir(exist_ok=True)
    out.rename(partial)
    man = json.loads((partial / "manifest.json").read_text())
    man["status"] = "running"
    (partial / "manifest.json").write_text(json.dumps(man))
    (partial / "shards" / "shard-00002.done").unlink()
    (partial / "shards" / "shard-00002.parquet").unlink()
    (partial / "proximity_scores.parquet").unlink()
    score_pool(ScoreConfig(), run)
    assert pq.read_table(out / "proximity_scores.parquet").equals(first)
    for p in parts:
        if p.name != "shard-00002.parquet":
            assert p.stat().st_mtime_ns == mtimes[p.name], f"{p.name} was recomputed"


def test_feature_dimension_mismatch_names_both_dimensions(fitted_run, tmp_path):
    run = copy_run(fitted_run, tmp_path)
    near, far, vla = gaussian_features(20, 20, 20, 8)
    write_features(run, [("near", "vlm", near), ("far", "vlm", far), ("robot", "vla", vla)],
                   config=FakeFeaturizeConfig(dim=8, variant="smaller"))  # fmt: skip
    with pytest.raises(StageError, match=r"expects 16-dim features but the feature run .* has dim 8"):
        score_pool(ScoreConfig(), run)


def test_estimator_from_another_feature_run_is_rejected_unless_allowed(fitted_run, tmp_path):
    run = copy_run(fitted_run, tmp_path)
    near, far, vla = gaussian_features(20, 20, 20, 16, seed=5)
    write_features(run, [("near", "vlm", near), ("far", "vlm", far), ("robot", "vla", vla)],
                   config=FakeFeaturizeConfig(variant="other pool"))  # fmt: skip
    with pytest.raises(StageError, match="fitted on feature run .* but the pool features are from"):
        score_pool(ScoreConfig(), run)
    out = score_pool(ScoreConfig(allow_foreign_estimator=True), run)
    assert pq.read_metadata(out / "proximity_scores.parquet").num_rows == 40


def test_nan_pool_features_are_named_or_recorded(fitted_run, tmp_path):
    run = copy_run(fitted_run, tmp_path)
    fs = open_features(run.stage_dir("featurize"))
    name = fs.names[1]
    arr = np.load(fs.shards_dir / f"{name}.npy")
    ids = fs.ids(name)
    row = next(i for i, k in enumerate(ids.column("kind").to_pylist()) if k == "vlm")
    arr[row, 2] = np.nan
    np.save(fs.shards_dir / f"{name}.npy", arr)
    bad_id = ids.column("id")[row].as_py()
    with pytest.raises(SampleError, match=rf"{name}\.npy row {row}: non-finite feature values") as exc:
        score_pool(ScoreConfig(allow_foreign_estimator=True), run)
    assert exc.value.sample_id == bad_id
    out = score_pool(ScoreConfig(on_error="skip", allow_foreign_estimator=True), run)
    table = pq.read_table(out / "proximity_scores.parquet")
    assert table.num_rows == 399 and bad_id not in table.column("id").to_pylist()
    assert run.manifest("score")["counts"]["skipped"] == {"non-finite feature values": 1}


def test_random_scorer_is_seeded_per_id_not_per_layout():
    ids = [f"s/{i}" for i in range(2000)]
    def scores(seed, chunk_ids):
        out = {"score": np.empty(len(chunk_ids))}
        RandomScorer(seed).score_chunk(np.zeros((len(chunk_ids), 1), np.float16), chunk_ids, out)
        return out["score"]

    a, b, c = scores(0, ids), scores(0, ids[1500:]), scores(1, ids)
    np.testing.assert_array_equal(a[1500:], b)
    assert not np.array_equal(a, c)
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.03


def test_mean_distance_scorer_matches_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 6)).astype(np.float32)
    x = rng.standard_normal((30, 6)).astype(np.float16)
    d = np.linalg.norm(x.astype(np.float64)[:, None, :] - ref[None].astype(np.float64), axis=2)
    got, got_knn = {"score": np.empty(30)}, {"score": np.empty(30)}
    MeanDistanceScorer(ref, block_rows=7).score_chunk(x, [""] * 30, got)
    MeanDistanceScorer(ref, knn=5).score_chunk(x, [""] * 30, got_knn)
    got, got_knn = got["score"], got_knn["score"]
    np.testing.assert_allclose(got, -d.mean(1), rtol=1e-4)
    np.testing.assert_allclose(got_knn, -np.sort(d, axis=1)[:, :5].mean(1), rtol=1e-4)


def test_baseline_scorers_run_as_stages(fitted_run, tmp_path):
    run = copy_run(fitted_run, tmp_path)
    out = score_pool(ScoreConfig(scorer="mean_distance", knn=10), run)
    t = pq.read_table(out / "proximity_scores.parquet")
    assert t.column_names == ["id", "source", "score"] and t.num_rows == 400
    near = t.filter(pc.equal(t.column("source"), "near")).column("score").to_numpy().mean()
    far = t.filter(pc.equal(t.column("source"), "far")).column("score").to_numpy().mean()
    assert near > far  # closer to the VLA rows
    assert run.manifest("score")["order_column"] == "score" and run.manifest("score")["reference_rows"] == 200
    out = score_pool(ScoreConfig(scorer="random", seed=3, pool_sources=["near"]), run)
    t = pq.read_table(out / "proximity_scores.parquet")
    assert t.num_rows == 150 and set(t.column("source").to_pylist()) == {"near"}


def test_score_feature_shard_detects_a_corrupt_shard(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((3, 4), np.float16))
    with pytest.raises(StageError, match="has 3 rows but its ids file lists 4"):
        score_feature_shard(RandomScorer(0), tmp_path / "s.npy", ["a", "b", "c", "d"], 2)
    with pytest.raises(StageError, match=r"s.npy: features have dimension 4 but the proximity scorer expects 8"):
        score_feature_shard(ProximityScorer(ProximityEstimator(8)), tmp_path / "s.npy", ["a", "b", "c"], 2)


def test_perplexity_scorers_require_their_models():
    with pytest.raises(ConfigError, match="vla_model"):
        load_config(ScoreConfig, None, ["scorer=vla_perplexity"])
    with pytest.raises(ConfigError, match="base_model"):
        load_config(ScoreConfig, None, ["scorer=delta_perplexity", "vla_model=/m"])


def test_an_empty_pool_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path / "run")
    _, _, vla = gaussian_features(0, 0, 30, 8)
    write_features(run, [("robot", "vla", vla)], config=FakeFeaturizeConfig(dim=8))
    with pytest.raises(StageError, match=r"the VLM pool \(kind 'vlm'\) set is empty; sources in this feature run: robot \(vla\)"):
        score_pool(ScoreConfig(scorer="random"), run)
