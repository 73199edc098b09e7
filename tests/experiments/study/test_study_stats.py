"""Linear CKA against its feature-space formula, and the study's intervals: the two-way bootstrap
against explicit resampling, seed variance the pooled-episode interval would miss, and pairing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from midtrain.eval.results import wilson_interval
from midtrain.experiments.study.cka import cka_per_layer, evenly_spaced, linear_cka
from midtrain.experiments.study.stats import paired_interval, replicate_means, success_summary, t_interval


def _cka_feature_space(x, y):
    """Kornblith et al.'s feature-space form ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred with H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    x, y = h @ x, h @ y
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_the_feature_space_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(40, 7))  # related, another width
    assert linear_cka(x, y) == pytest.approx(_cka_feature_space(x, y), rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    unrelated = rng.normal(size=(40, 12))
    assert linear_cka(x, unrelated) < linear_cka(x, y) < 1.0
    assert linear_cka(x, np.ones((40, 3))) == 0.0  # no variance: undefined, reported as 0
    stack_a, stack_b = np.stack([x, x]), np.stack([x, unrelated])
    assert cka_per_layer(stack_a, stack_b) == pytest.approx([1.0, linear_cka(x, unrelated)])
    with pytest.raises(ValueError):
        linear_cka(x, y[:-1])


def test_evenly_spaced_spans_the_rows():
    rows = [{"i": i} for i in range(100)]
    picked = [r["i"] for r in evenly_spaced(rows, 5)]
    assert picked == [0, 25, 50, 74, 99] and len(evenly_spaced(rows[:3], 5)) == 3


def test_replicates_equal_explicit_resampling():
    """The weighted form of a replicate equals the mean recomputed on resampled seeds and episodes."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 2, size=(3, 5)).astype(float), rng.integers(0, 2, size=(3, 8)).astype(float)]
    for _ in range(20):
        seeds = rng.integers(0, 3, size=3)
        eps = [rng.integers(0, a.shape[1], size=a.shape[1]) for a in arrays]
        explicit = np.mean([a[seeds][:, e].mean() for a, e in zip(arrays, eps)])
        w_seed = np.bincount(seeds, minlength=3)[None].astype(float)
        w_eps = [np.bincount(e, minlength=a.shape[1])[None].astype(float) for a, e in zip(arrays, eps)]
        assert replicate_means(arrays, w_seed, w_eps)[0] == pytest.approx(explicit, abs=1e-12)


def _seeds(*per_seed):
    return [{"t": list(map(bool, s))} for s in per_seed]


def test_seed_variance_widens_the_interval_where_pooled_episodes_would_not():
    """One policy always succeeds, the other never: 50% pooled over 40 episodes has a tight Wilson
    interval, but which policy training produces is the main uncertainty."""
    split = success_summary(_seeds([1] * 20, [0] * 20))
    lo, hi = wilson_interval(20, 40)
    assert split["mean"] == 0.5 and split["per_seed"] == [1.0, 0.0]
    assert split["ci95"][0] <= 0.01 and split["ci95"][1] >= 0.99 and hi - lo < 0.35
    same = success_summary(_seeds([1] * 10 + [0] * 10, [1] * 10 + [0] * 10))
    assert 0.25 < same["ci95"][0] < 0.5 < same["ci95"][1] < 0.75  # identical seeds: the episode bootstrap alone
    assert success_summary(_seeds([1] * 20, [1] * 20))["ci95"] == [1.0, 1.0]


def test_paired_differences_use_the_shared_episodes():
    """Both rows succeed on the same easy half of the states; the row also on five more. Marginal
    intervals overlap, the paired one excludes 0 (a replicate shows no difference only when it
    draws none of the five states: (15/20)^20 = 0.3% of them)."""
    base = _seeds([1] * 10 + [0] * 10, [1] * 10 + [0] * 10, [1] * 10 + [0] * 10)
    row = _seeds([1] * 15 + [0] * 5, [1] * 15 + [0] * 5, [1] * 15 + [0] * 5)
    a, b = success_summary(row), success_summary(base)
    assert a["ci95"][0] < b["ci95"][1]  # the marginal intervals overlap
    diff = paired_interval(row, base)
    assert diff["mean"] == pytest.approx(0.25) and diff["ci95"][0] > 0 and diff["share_of_replicates_above_0"] > 0.99
    assert paired_interval(base, base)["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same protocol"):
        paired_interval(_seeds([1, 0]), base)


def test_every_seed_must_run_the_same_protocol():
    with pytest.raises(ValueError, match="different episodes"):
        success_summary([{"t": [True, False]}, {"t": [True]}])


def test_t_interval_matches_scipy():
    vals = [0.31, 0.27, 0.35, 0.30]
    lo, hi = sps.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=sps.sem(vals))
    out = t_interval(vals)
    assert out["ci95"] == pytest.approx([lo, hi], abs=1e-5) and out["n"] == 4
    assert t_interval([0.3])["ci95"] is None and t_interval([None])["mean"] is None
