"""``midtrain select``: exact top-K with deterministic ties, Gumbel sampling, source limits,
de-duplication, the report, re-selection without re-scoring, and bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_fixtures import FakeFeaturizeConfig, build_run, gaussian_features, vlm_row, write_catalog, write_features

from midtrain.cli import main as cli_main
from midtrain.config import ConfigError, load_config
from midtrain.data.images import encode_image, ref_from_bytes
from midtrain.runs import RunDir, StageError
from midtrain.fit.config import FitConfig
from midtrain.fit.stage import fit_estimator
from midtrain.score.config import ScoreConfig
from midtrain.score.stage import score_pool
from midtrain.select.config import SelectConfig
from midtrain.select.stage import choose_with_source_limits, gumbel_keys, select_mixture


def write_scores(dirpath, ids, sources, scores, order_column="score"):
    """A score file with its manifest (what `select` reads), outside any run."""
    dirpath.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "source": sources, "score": np.asarray(scores, np.float64)}),
                   dirpath / "proximity_scores.parquet")  # fmt: skip
    (dirpath / "manifest.json").write_text(json.dumps({"scorer": "test", "order_column": order_column}))
    return dirpath / "proximity_scores.parquet"


def selection(run: RunDir) -> pa.Table:
    return pq.read_table(run.stage_dir("select") / "selection.parquet")


def selected_ids(run: RunDir) -> list[str]:
    t = selection(run)
    return t.filter(t.column("selected")).column("id").to_pylist()


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("scored"))
    fit_estimator(FitConfig(max_epochs=8), run)
    score_pool(ScoreConfig(), run)
    return run


@pytest.fixture
def run_copy(scored_run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(scored_run.root, dst)
    return RunDir(dst)


def test_top_k_is_exact_and_ties_are_broken_by_id_whatever_the_row_order(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    ids = [f"s/{i:03d}" for i in range(n)]
    scores = np.round(rng.uniform(size=n), 1)  # many exact ties
    expected = sorted(range(n), key=lambda i: (-scores[i], ids[i]))[:37]
    for trial, perm in enumerate([np.arange(n), rng.permutation(n)]):
        path = write_scores(tmp_path / f"scores{trial}", [ids[i] for i in perm], ["s"] * n, scores[perm])
        run = RunDir(tmp_path / f"run{trial}")
        select_mixture(SelectConfig(k=37, scores=path, report=False), run)
        t = selection(run)
        assert t.column("rank").to_pylist() == list(range(1, n + 1))  # sorted by rank
        assert t.column("id").to_pylist()[:37] == [ids[i] for i in expected]
        assert sorted(selected_ids(run)) == sorted(ids[i] for i in expected)


def test_fraction_and_pool_sources(tmp_path):
    path = write_scores(tmp_path / "s", [f"a/{i}" for i in range(10)] + [f"b/{i}" for i in range(10)],
                        ["a"] * 10 + ["b"] * 10, np.r_[np.arange(10) + 100, np.arange(10)])  # fmt: skip
    run = RunDir(tmp_path / "run")
    select_mixture(SelectConfig(fraction=0.3, pool_sources=["b"], scores=path, report=False), run)
    assert sorted(selected_ids(run)) == ["b/7", "b/8", "b/9"]  # 30% of the 10 eligible rows, all from b


def test_k_larger_than_the_pool_and_bad_k_settings(tmp_path):
    path = write_scores(tmp_path / "s", ["a/0", "a/1"], ["a", "a"], [0.1, 0.2])
    with pytest.raises(StageError, match=r"k = 3 is larger than the eligible pool \(2 rows of 2"):
        select_mixture(SelectConfig(k=3, scores=path, report=False), RunDir(tmp_path / "run"))
    with pytest.raises(ConfigError, match="set exactly one"):
        load_config(SelectConfig, None, ["k=3", "fraction=0.5"])
    with pytest.raises(ConfigError, match="set exactly one"):
        load_config(SelectConfig, None, [])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(SelectConfig, None, ["k=1", "temperature=0"])


def test_nan_scores_and_unknown_sources_are_named(tmp_path):
    path = write_scores(tmp_path / "s", ["a/0", "a/1"], ["a", "a"], [0.1, float("nan")])
    with pytest.raises(StageError, match=r"1 non-finite score value\(s\) \(first: row 1, id a/1\)"):
        select_mixture(SelectConfig(k=1, scores=path, report=False), RunDir(tmp_path / "run"))
    path = write_scores(tmp_path / "t", ["a/0", "a/1"], ["a", "a"], [0.1, 0.2])
    with pytest.raises(StageError, match=r"source_caps: source\(s\) \['b'\] are not in .*pool sources: a"):
        select_mixture(SelectConfig(k=1, scores=path, report=False, source_caps={"b": 1}), RunDir(tmp_path / "run"))


def test_gumbel_sampling_is_seeded_and_proportional_to_the_density_ratio(tmp_path):
    ids = pa.array([f"x/{i}" for i in range(4)])
    log_r = np.log(np.array([1.0, 2.0, 3.0, 4.0]))
    wins = np.bincount([int(np.argmax(gumbel_keys(log_r, ids, 1.0, seed))) for seed in range(4000)], minlength=4)
    np.testing.assert_allclose(wins / 4000, [0.1, 0.2, 0.3, 0.4], atol=0.03)  # K=1: P(i) = r_i / sum r
    cold = np.bincount([int(np.argmax(gumbel_keys(log_r, ids, 0.01, seed))) for seed in range(200)], minlength=4)
    assert cold[3] == 200  # T -> 0 is top-K
    # the stage: same seed -> same selection; another seed -> another one
    n = 200
    path = write_scores(tmp_path / "s", [f"s/{i}" for i in range(n)], ["s"] * n, np.linspace(0.01, 0.99, n))
    picks = []
    for i, seed in enumerate([0, 0, 1]):
        run = RunDir(tmp_path / f"run{i}")
        select_mixture(SelectConfig(k=50, method="gumbel", seed=seed, scores=path, report=False), run)
        picks.append(sorted(selected_ids(run)))
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_source_floors_then_fill_by_rank_with_caps():
    # candidates in preference order; sources: 0 = a, 1 = b, 2 = c
    codes = np.array([0, 0, 0, 0, 1, 1, 2, 2, 1, 2])
    cand = np.arange(10)
    names = ["a", "b", "c"]
    inf = np.inf
    # floor c = 2, cap a = 2, K = 5: c's two best (6, 7), then by rank 0, 1 (a capped), then 4
    got = choose_with_source_limits(cand, codes, 5, np.array([0, 0, 2.0]), np.array([2, inf, inf]), names)
    assert got.tolist() == [0, 1, 4, 6, 7]
    with pytest.raises(StageError, match="source_floors add up to 6, more than K = 5"):
        choose_with_source_limits(cand, codes, 5, np.array([3.0, 3, 0]), np.full(3, inf), names)
    with pytest.raises(StageError, match=r"source_floors.c: asks for 4 rows but only 3"):
        choose_with_source_limits(cand, codes, 5, np.array([0, 0, 4.0]), np.full(3, inf), names)
    with pytest.raises(StageError, match="source_caps are too tight"):
        choose_with_source_limits(cand, codes, 5, np.zeros(3), np.array([1, 1, 1.0]), names)
    with pytest.raises(StageError, match=r"source_floors.a \(2\) is above source_caps.a \(1\)"):
        choose_with_source_limits(cand, codes, 5, np.array([2.0, 0, 0]), np.array([1, inf, inf]), names)


def test_source_limits_in_the_stage_as_counts_and_fractions(run_copy):
    select_mixture(SelectConfig(k=100, source_caps={"near": 0.5}, source_floors={"far": 10}, report=False), run_copy)
    t = selection(run_copy).to_pandas()
    sel = t[t.selected]
    assert len(sel) == 100 and (sel.source == "near").sum() == 50 and (sel.source == "far").sum() == 50
    # the near rows taken are near's 50 best, the far rows far's 50 best
    for src in ("near", "far"):
        rows = t[t.source == src]
        assert set(rows.id[:50]) == set(sel.id[sel.source == src])


def test_dedup_keeps_the_highest_scoring_copy(tmp_path):
    run = RunDir(tmp_path / "run")
    img = ref_from_bytes(encode_image(np.full((8, 8, 3), 9, np.uint8)))
    other = ref_from_bytes(encode_image(np.full((8, 8, 3), 10, np.uint8)))
    rows = [vlm_row("a", i, img) for i in range(6)]
    for i in (1, 3):  # same content as row 0 (same text: vlm_row's text depends on i)
        rows[i]["messages"] = rows[0]["messages"]
    rows[5]["messages"] = rows[0]["messages"]
    rows[5]["image_refs"] = [other]  # same text, other image: not a duplicate
    write_catalog(run, {"a": rows})
    path = write_scores(tmp_path / "s", [f"a/{i}" for i in range(6)], ["a"] * 6, [0.1, 0.9, 0.5, 0.8, 0.2, 0.3])
    select_mixture(SelectConfig(k=4, dedup=True, scores=path, report=False), run)
    assert sorted(selected_ids(run)) == ["a/1", "a/2", "a/4", "a/5"]
    dups = pq.read_table(run.stage_dir("select") / "duplicates.parquet").to_pydict()
    assert sorted(zip(dups["id"], dups["kept_id"])) == [("a/0", "a/1"), ("a/3", "a/1")]
    assert run.manifest("select")["counts"]["duplicates"] == 2
    with pytest.raises(StageError, match=r"larger than the eligible pool \(4 rows of 6.*after removing 2 duplicates"):
        select_mixture(SelectConfig(k=5, dedup=True, scores=path, report=False), run)


def test_selection_report_moves_towards_the_vla_data(run_copy):
    out = select_mixture(SelectConfig(k=80, gallery_size=3), run_copy)
    m = json.loads((out / "selection_metrics.json").read_text())
    assert m["mmd_selection_vla"] < m["mmd_random_vla"]  # the selection objective
    assert m["mmd_sigma"] > 0 and m["metric_samples"] == {"selection": 80, "random": 80, "pool": 400, "vla": 200}
    for key in ("diversity_pool", "diversity_selection", "diversity_vla"):
        assert m[key] > 1.0
    shares = {s["source"]: s for s in m["per_source"]}
    assert shares["near"]["selection_share"] > shares["near"]["pool_share"]
    assert sum(s["selected_count"] for s in m["per_source"]) == 80
    report = out / "report"
    for name in ("pool_vs_selection.png", "score_distributions.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gallery = json.loads((report / "gallery.json").read_text())
    t = selection(run_copy)
    assert [g["id"] for g in gallery["top"]] == t.column("id").to_pylist()[:3]
    assert [g["id"] for g in gallery["bottom"]] == t.column("id").to_pylist()[::-1][:3]
    for side in ("top", "bottom"):
        for i, item in enumerate(gallery[side]):
            assert item["messages"][0]["role"] == "user" and item["thumbnail"] == f"gallery_{side}_{i:02d}.png"
            assert (report / item["thumbnail"]).exists()
    assert run_copy.manifest("select")["mmd_selection_vla"] == m["mmd_selection_vla"]


def test_reselection_reuses_the_scores(run_copy):
    scores = run_copy.stage_dir("score") / "proximity_scores.parquet"
    before = (scores.stat().st_mtime_ns, run_copy.manifest("score")["timings"]["started"])
    assert cli_main(["select", "--run-dir", str(run_copy.root), "k=50", "report=false"]) == 0
    assert len(selected_ids(run_copy)) == 50
    select_mixture(SelectConfig(k=80, method="gumbel", report=False), run_copy)
    assert len(selected_ids(run_copy)) == 80
    assert (scores.stat().st_mtime_ns, run_copy.manifest("score")["timings"]["started"]) == before


def test_scores_from_a_different_feature_run_are_rejected(run_copy):
    near, far, vla = gaussian_features(150, 250, 200, 16, seed=9)
    write_features(run_copy, [("near", "vlm", near), ("far", "vlm", far), ("robot", "vla", vla)],
                   config=FakeFeaturizeConfig(variant="re-featurized"))  # fmt: skip
    with pytest.raises(StageError, match="scores were computed on feature run .* re-run `midtrain score`"):
        select_mixture(SelectConfig(k=10), run_copy)
