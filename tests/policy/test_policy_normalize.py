"""Normalisation: each mode maps its reference points where it says, and round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midtrain.policy.normalize import NORM_MODES, Normalizer, compute_stats


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(3.0, 2.0, 2000), rng.uniform(-5, 1, 2000), np.full(2000, 0.7), np.where(rng.random(2000) < 0.4, 1.0, -1.0)], 1)
    return x.astype(np.float32)


def test_stats_match_numpy(data):
    s = compute_stats(data)
    np.testing.assert_allclose(s["mean"], data.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s["q99"], np.quantile(data.astype(np.float64), 0.99, axis=0), rtol=1e-9)
    assert s["min"][1] == pytest.approx(float(data[:, 1].min()))


@pytest.mark.parametrize("mode", NORM_MODES)
def test_round_trip_numpy_and_torch(data, mode):
    norm = Normalizer(mode, compute_stats(data))
    y = norm.normalize(data)
    np.testing.assert_allclose(norm.unnormalize(y), data, rtol=1e-5, atol=1e-5)
    t = torch.from_numpy(data)
    yt = norm.normalize(t)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm.unnormalize(yt).numpy(), data, rtol=1e-5, atol=1e-5)


def test_modes_hit_their_reference_points(data):
    s = compute_stats(data)
    mm = Normalizer("min_max", s).normalize(data)
    assert mm[:, :2].min(0) == pytest.approx([-1, -1], abs=1e-6) and mm[:, :2].max(0) == pytest.approx([1, 1], abs=1e-6)
    q = Normalizer("q01_q99", s).normalize(np.array([s["q01"], s["q99"]], dtype=np.float32))
    np.testing.assert_allclose(q[:, :2], [[-1, -1], [1, 1]], atol=1e-5)
    ms = Normalizer("mean_std", s).normalize(data)
    np.testing.assert_allclose(ms[:, :2].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(ms[:, :2].std(0), 1, atol=1e-4)
    assert np.isfinite(ms).all() and np.isfinite(mm).all()  # the constant dimension does not divide by zero


def test_gripper_binarised(data):
    norm = Normalizer("q01_q99", compute_stats(data), gripper_dims=[3], binarize_gripper=True)
    y = norm.normalize(data)
    assert set(np.unique(y[:, 3])) == {0.0, 1.0}
    np.testing.assert_array_equal(y[:, 3] == 1.0, data[:, 3] > 0)
    back = norm.unnormalize(np.array([[0, 0, 0, 0.9], [0, 0, 0, 0.2]], dtype=np.float32))
    assert back[:, 3].tolist() == [1.0, -1.0]  # probability > 0.5: the dimension's max, else its min
    np.testing.assert_allclose(norm.unnormalize(y)[:, :3], data[:, :3], rtol=1e-5, atol=1e-5)
    again = Normalizer.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.normalize(data), y)


def test_bad_mode_and_dims():
    s = compute_stats(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="normalization"):
        Normalizer("zscore", s)
    with pytest.raises(ValueError, match="gripper_dims"):
        Normalizer("min_max", s, gripper_dims=[5])
