"""midtrain.etc.measures (the recipes' copy of the study's CKA and intervals): independent oracles."""

from __future__ import annotations

import numpy as np

from midtrain.etc.measures import linear_cka, paired_interval, success_summary


def test_linear_cka_is_one_under_rotation_and_scale_and_matches_the_feature_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert abs(linear_cka(x, 3.0 * x @ q) - 1.0) < 1e-9
    y = rng.normal(size=(20, 7))
    xc, yc = x - x.mean(0), y - y.mean(0)  # Kornblith's feature-space form ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)
    want = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert abs(linear_cka(x, y) - want) < 1e-9 and linear_cka(x, y) < 0.9


def test_success_intervals_cover_the_mean_and_a_paired_difference_of_equal_rows_is_zero():
    a = [{"t": [True, False, True, True]}, {"t": [False, False, True, True]}]
    b = [{"t": [True, True, True, True]}, {"t": [True, True, True, False]}]
    s = success_summary(a)
    assert s["mean"] == 0.625 and s["per_seed"] == [0.75, 0.5] and s["ci95"][0] <= 0.625 <= s["ci95"][1]
    same = paired_interval(a, a)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]
    d = paired_interval(b, a)
    assert d["mean"] == 0.25 and d["ci95"][0] <= 0.25 <= d["ci95"][1]
