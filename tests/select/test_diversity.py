"""Source diversity of a selection: the formulas on hand-computed cases, and the select stage reporting it."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midtrain.runs import RunDir
from midtrain.select.diversity import source_diversity
from midtrain.select.config import SelectConfig
from midtrain.select.stage import select_mixture

POOL = ["a"] * 10 + ["b"] * 10 + ["c"] * 10 + ["d"] * 10


def test_one_source_has_zero_entropy_and_equal_shares_have_one():
    one = source_diversity(["a"] * 8, POOL)
    assert (one["sources_covered"], one["normalised_entropy"], one["effective_sources"]) == (1, 0.0, 1.0)
    even = source_diversity(["a", "b", "c", "d"] * 2, POOL)
    assert even["sources_covered"] == 4 and even["normalised_entropy"] == pytest.approx(1.0)
    assert even["effective_sources"] == pytest.approx(4.0)
    assert even["pool_normalised_entropy"] == pytest.approx(1.0) and even["sources_in_pool"] == 4


def test_uneven_shares_against_a_hand_computed_entropy():
    d = source_diversity(["a"] * 6 + ["b"] * 2, POOL)  # shares 3/4, 1/4 of 4 pool sources
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert d["normalised_entropy"] == pytest.approx(h / math.log(4))
    assert d["effective_sources"] == pytest.approx(math.exp(h))
    assert d["sources_covered"] == 2 and d["selected"] == 8
    assert d["shares"] == {"a": 0.75, "b": 0.25, "c": 0.0, "d": 0.0}
    unbalanced_pool = source_diversity(["a"], ["a"] * 30 + ["b"] * 10)
    assert unbalanced_pool["pool_normalised_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))


def test_a_selected_source_outside_the_pool_is_an_error():
    with pytest.raises(ValueError, match="'z'"):
        source_diversity(["a", "z"], POOL)


def test_select_stage_reports_the_diversity_of_what_it_selected(tmp_path):
    ids = [f"{s}/{i}" for i, s in enumerate(POOL)]
    scores = np.r_[np.linspace(0.9, 0.8, 10), np.linspace(0.7, 0.6, 10), np.linspace(0.5, 0.4, 10), np.linspace(0.3, 0.2, 10)]
    (tmp_path / "scores").mkdir()
    path = tmp_path / "scores" / "proximity_scores.parquet"
    pq.write_table(pa.table({"id": ids, "source": POOL, "score": scores}), path)
    (tmp_path / "scores" / "manifest.json").write_text(json.dumps({"scorer": "test", "order_column": "score"}))
    run = RunDir(tmp_path / "run")
    select_mixture(SelectConfig(k=15, scores=path, report=False), run)  # the 10 of a, then 5 of b
    d = json.loads((run.stage_dir("select") / "selection_metrics.json").read_text())["source_diversity"]
    assert d["sources_covered"] == 2 and d["sources_in_pool"] == 4
    assert d["shares"] == pytest.approx({"a": 10 / 15, "b": 5 / 15, "c": 0.0, "d": 0.0})
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert d["normalised_entropy"] == pytest.approx(h / math.log(4))
