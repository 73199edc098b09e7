"""MMD estimators, median heuristic and permutation tests against a straightforward NumPy/SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gap_fixtures import single_torch_thread  # noqa: F401 (autouse fixture)
from scipy.spatial.distance import cdist, pdist

from midtrain.gap.mmd import (
    GapInputError,
    bandwidths,
    median_heuristic,
    mmd_matrix,
    mmd_matrix_rff,
    permutation_masks,
)


def reference_kernel(x, y, sigmas):
    d2 = cdist(np.asarray(x, np.float64), np.asarray(y, np.float64), "sqeuclidean")
    return sum(np.exp(-d2 / (2 * s * s)) for s in sigmas)


def reference_mmd2(x, y, sigmas, unbiased):
    """Textbook estimators with explicit loops over the three kernel blocks."""
    kxx, kyy, kxy = reference_kernel(x, x, sigmas), reference_kernel(y, y, sigmas), reference_kernel(x, y, sigmas)
    n, m = len(x), len(y)
    if unbiased:
        off = lambda k: k.sum() - np.trace(k)  # noqa: E731
        return off(kxx) / (n * (n - 1)) + off(kyy) / (m * (m - 1)) - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def gaussian_sets(rng, sizes, shifts, dim=6):
    return {f"set{i}": rng.normal(shift, 1.0, size=(n, dim)) for i, (n, shift) in enumerate(zip(sizes, shifts))}


@pytest.mark.parametrize("budget_mb", [512, 0.002])  # one tile per pair / many row chunks per tile
@pytest.mark.parametrize("factors", [(1.0,), (0.5, 1.0, 2.0)])
def test_matrix_agrees_with_reference(budget_mb, factors):
    rng = np.random.default_rng(1)
    data = gaussian_sets(rng, [60, 75, 90, 50], [0.0, 0.1, 0.4, 1.0])
    sigmas = bandwidths(median_heuristic(np.concatenate(list(data.values()))), factors)
    result = mmd_matrix(data, sigmas, block_budget_mb=budget_mb)
    names = list(data)
    for a in range(4):
        for b in range(4):
            if a == b:
                continue
            x, y = data[names[a]], data[names[b]]
            assert result.mmd2_unbiased[a, b] == pytest.approx(reference_mmd2(x, y, sigmas, True), abs=2e-7)
            assert result.mmd2_biased[a, b] == pytest.approx(reference_mmd2(x, y, sigmas, False), abs=2e-7)
    assert result.sizes == [60, 75, 90, 50]
    assert result.flops["gram"] == pytest.approx(
        sum(2.0 * na * nb * 6 for i, na in enumerate(result.sizes) for nb in result.sizes[i:])
    )


def test_symmetric_with_zero_diagonal_and_biased_above_unbiased():
    rng = np.random.default_rng(2)
    data = gaussian_sets(rng, [40, 50, 60], [0.0, 0.5, 1.0])
    result = mmd_matrix(data, (3.0,), permutations=30)
    for matrix in (result.mmd2_unbiased, result.mmd2_biased, result.p_values, result.mmd):
        np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(result.mmd2_unbiased), 0.0)
    np.testing.assert_array_equal(np.diag(result.mmd), 0.0)
    # the biased estimator adds the positive k(x,x) terms: it exceeds the unbiased one off the diagonal
    off = ~np.eye(3, dtype=bool)
    assert (result.mmd2_biased[off] > result.mmd2_unbiased[off]).all()


def test_same_distribution_is_near_zero_and_not_significant():
    rng = np.random.default_rng(3)
    values, p_values = [], []
    for repeat in range(100):  # 100 repeats: the >= 90% criterion then fails by chance for ~1% of seeds
        x, y = rng.normal(size=(120, 5)), rng.normal(size=(120, 5))
        result = mmd_matrix({"x": x, "y": y}, (np.sqrt(10.0),), permutations=100, seed=repeat)
        values.append(result.mmd2_unbiased[0, 1])
        p_values.append(result.p_values[0, 1])
        null = result.null_mmd2[0, 1]
        assert abs(values[-1]) < 4 * null.std() + 1e-12  # within the permutation null's spread
    assert np.mean(np.asarray(p_values) > 0.05) >= 0.9
    assert 0.35 < np.mean(p_values) < 0.65  # p-values are roughly uniform under the null
    assert abs(np.mean(values)) < 5e-3  # the unbiased estimator has mean 0 under the null


def test_shifted_gaussians_are_significant():
    rng = np.random.default_rng(4)
    for repeat in range(20):
        x, y = rng.normal(0.0, 1.0, size=(120, 5)), rng.normal(0.6, 1.0, size=(120, 5))
        result = mmd_matrix({"x": x, "y": y}, (np.sqrt(10.0),), permutations=100, seed=repeat)
        assert result.mmd2_unbiased[0, 1] > 0.05
        # nothing in the null reaches the observed value: the smallest p-value 100 permutations allow
        assert result.p_values[0, 1] == pytest.approx(1 / 101)


@pytest.mark.parametrize("statistic", ["unbiased", "biased"])
def test_permutation_null_is_the_statistic_of_relabelled_samples(statistic):
    """The null distribution, re-indexed from the Gram tiles, equals recomputing each permutation from scratch."""
    rng = np.random.default_rng(5)
    data = gaussian_sets(rng, [30, 45, 25], [0.0, 0.3, 0.3])
    sigmas = (2.0, 4.0)
    result = mmd_matrix(data, sigmas, permutations=40, statistic=statistic, seed=11, block_budget_mb=0.001)
    names = list(data)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        pooled = np.concatenate([data[names[a]], data[names[b]]])
        masks = permutation_masks(len(data[names[a]]), len(data[names[b]]), 40, seed=11, pair=(a, b))
        assert masks[0].sum() == masks[1:].sum(1).max() == masks[1:].sum(1).min() == len(data[names[a]])
        expected = [reference_mmd2(pooled[m], pooled[~m], sigmas, statistic == "unbiased") for m in masks[1:]]
        np.testing.assert_allclose(result.null_mmd2[a, b], expected, atol=2e-6)
        observed = reference_mmd2(data[names[a]], data[names[b]], sigmas, statistic == "unbiased")
        p_ref = (1 + sum(e >= observed for e in expected)) / 41
        assert result.p_values[a, b] == pytest.approx(p_ref)


def test_permutations_are_seeded():
    rng = np.random.default_rng(6)
    data = gaussian_sets(rng, [30, 30], [0.0, 0.1])
    first = mmd_matrix(data, (3.0,), permutations=50, seed=1)
    again = mmd_matrix(data, (3.0,), permutations=50, seed=1)
    other = mmd_matrix(data, (3.0,), permutations=50, seed=2)
    np.testing.assert_array_equal(first.null_mmd2, again.null_mmd2)
    assert not np.array_equal(first.null_mmd2, other.null_mmd2)


def test_median_heuristic_on_known_distances():
    # points 0, 1, 2 on a line: distances 1, 2, 1 -> median 1
    assert median_heuristic(np.array([[0.0], [1.0], [2.0]])) == pytest.approx(1.0)
    # the scaled standard basis: every pairwise distance is 3 * sqrt(2)
    assert median_heuristic(3.0 * np.eye(7)) == pytest.approx(3.0 * np.sqrt(2.0))
    # 4 points with distances {1, 1, 1, 1, sqrt2, sqrt2} (unit square) -> median 1
    square = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert median_heuristic(square) == pytest.approx(1.0)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 20)) * 50 + 1000  # large offset: centring keeps it exact
    assert median_heuristic(x, max_points=1000) == pytest.approx(np.median(pdist(x)), rel=1e-9)


def test_median_heuristic_subsample_is_seeded_and_close():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3000, 10))
    a = median_heuristic(x, max_points=500, seed=3)
    assert a == median_heuristic(x, max_points=500, seed=3)
    assert a != median_heuristic(x, max_points=500, seed=4)
    assert a == pytest.approx(np.sqrt(2 * 10), rel=0.05)  # E||x - y||^2 = 2d for standard normals


def test_median_heuristic_rejects_constant_features():
    with pytest.raises(GapInputError, match="median pairwise distance .* is 0"):
        median_heuristic(np.ones((10, 3)))


def test_rff_approximates_exact_and_tests_like_it():
    rng = np.random.default_rng(9)
    data = gaussian_sets(rng, [150, 150, 150], [0.0, 0.0, 0.8], dim=5)
    sigmas = bandwidths(median_heuristic(np.concatenate(list(data.values()))), (0.5, 1.0))
    exact = mmd_matrix(data, sigmas, permutations=60)
    approx = mmd_matrix_rff(data, sigmas, num_features=4096, permutations=60, block_budget_mb=0.5)
    assert approx.method == "rff(4096)"
    for a, b in [(0, 2), (1, 2)]:
        assert approx.mmd2_biased[a, b] == pytest.approx(exact.mmd2_biased[a, b], rel=0.1)
        assert approx.mmd2_unbiased[a, b] == pytest.approx(exact.mmd2_unbiased[a, b], rel=0.1)
        assert approx.p_values[a, b] < 0.05
    assert approx.p_values[0, 1] > 0.05
    assert abs(approx.mmd2_unbiased[0, 1]) < 0.02
    np.testing.assert_array_equal(approx.mmd2_unbiased, approx.mmd2_unbiased.T)


def test_rff_permutation_null_matches_recomputed_features():
    """Feature chunks recomputed per pair (tiny budget) give the same null as cached features."""
    rng = np.random.default_rng(10)
    data = gaussian_sets(rng, [40, 50, 30], [0.0, 0.2, 0.5])
    cached = mmd_matrix_rff(data, (3.0,), num_features=256, permutations=25, seed=2)
    streamed = mmd_matrix_rff(data, (3.0,), num_features=256, permutations=25, seed=2, block_budget_mb=0.01)
    np.testing.assert_allclose(streamed.null_mmd2, cached.null_mmd2, atol=1e-6)
    np.testing.assert_allclose(streamed.mmd2_unbiased, cached.mmd2_unbiased, atol=1e-6)


@pytest.mark.parametrize("compute", [mmd_matrix, mmd_matrix_rff])
def test_bad_datasets_are_named(compute):
    good = np.zeros((5, 4)) + np.arange(5)[:, None]
    with pytest.raises(GapInputError, match="dataset 'tiny' has 1 sample"):
        compute({"a": good, "tiny": good[:1]}, (1.0,))
    with pytest.raises(GapInputError, match="dataset 'wide' has feature dimension 6 but dataset 'a' has 4"):
        compute({"a": good, "wide": np.zeros((5, 6))}, (1.0,))
    broken = good.copy()
    broken[3, 1] = np.nan
    with pytest.raises(GapInputError, match="dataset 'broken' has non-finite .* first at row 3"):
        compute({"a": good, "broken": broken}, (1.0,))
    with pytest.raises(GapInputError, match="got 1 dataset"):
        compute({"a": good}, (1.0,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(12)
    data = gaussian_sets(rng, [300, 250, 200], [0.0, 0.2, 0.6], dim=64)
    cpu = mmd_matrix(data, (10.0,), permutations=50, device="cpu")
    gpu = mmd_matrix(data, (10.0,), permutations=50, device="cuda")
    np.testing.assert_allclose(gpu.mmd2_unbiased, cpu.mmd2_unbiased, atol=1e-6)
    np.testing.assert_allclose(gpu.null_mmd2, cpu.null_mmd2, atol=1e-5)
    np.testing.assert_array_equal(gpu.p_values, cpu.p_values)
