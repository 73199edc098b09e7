"""The proximity estimator recovers a known density ratio, agrees with scikit-learn,
is deterministic, early-stops as configured and round-trips through safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression

from midtrain.fit.estimator import (
    ProximityEstimator,
    TrainSettings,
    balanced_batches,
    load_estimator,
    save_estimator,
    train_estimator,
)


def shifted_gaussians(n_pos=1500, n_neg=3000, dim=8, seed=0):
    """VLA ~ N(mu, diag(s^2)), pool ~ N(0, diag(s^2)) with very different per-dimension scales;
    the log density ratio is sum_j mu_j x_j / s_j^2 + const (linear)."""
    rng = np.random.default_rng(seed)
    scale = np.array([0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 1.0, 3.0])[:dim]
    mu = scale * np.array([1.0, -0.8, 0.6, 0.4, -0.5, 0.3, 0.0, 0.0])[:dim]
    pos = rng.standard_normal((n_pos, dim)) * scale + mu
    neg = rng.standard_normal((n_neg, dim)) * scale
    test = rng.standard_normal((2000, dim)) * scale
    log_ratio = test @ (mu / scale**2)
    return pos.astype(np.float32), neg.astype(np.float32), test.astype(np.float32), log_ratio


def test_linear_estimator_ranks_like_the_analytic_density_ratio_and_like_sklearn():
    pos, neg, test, log_ratio = shifted_gaussians()
    model, metrics = train_estimator(pos, neg, TrainSettings(max_epochs=30, seed=0))
    ours = model.score(test)
    assert spearmanr(ours, log_ratio).statistic >= 0.9
    # scikit-learn's logistic regression (class-balanced, on standardised features) on the same data
    mean, std = np.concatenate([pos, neg]).mean(0), np.concatenate([pos, neg]).std(0)
    X = (np.concatenate([pos, neg]) - mean) / std
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    ref = LogisticRegression(class_weight="balanced", max_iter=2000).fit(X, y)
    assert spearmanr(ours, ref.decision_function((test - mean) / std)).statistic >= 0.95
    assert metrics["val_auc"] > 0.8 and len(metrics["curve"]) == metrics["epochs_run"]


def test_mlp_captures_a_nonlinear_ratio_that_a_linear_model_cannot():
    """VLA ~ N(0, 0.5^2 I), pool ~ N(0, I): log r = -1.5 ||x||^2 + const (radial)."""
    rng = np.random.default_rng(3)
    pos = (0.5 * rng.standard_normal((1500, 4))).astype(np.float32)
    neg = rng.standard_normal((3000, 4)).astype(np.float32)
    test = rng.standard_normal((2000, 4)).astype(np.float32)
    truth = -(test**2).sum(1)
    mlp, _ = train_estimator(pos, neg, TrainSettings(model="mlp", hidden=[32, 32], lr=3e-3, max_epochs=40, seed=0))
    lin, _ = train_estimator(pos, neg, TrainSettings(max_epochs=10, seed=0))
    assert spearmanr(mlp.score(test), truth).statistic >= 0.9
    assert abs(spearmanr(lin.score(test), truth).statistic) < 0.5


def test_training_is_deterministic_for_a_seed():
    pos, neg, _, _ = shifted_gaussians(300, 600)
    settings = TrainSettings(model="mlp", hidden=[16], dropout=0.1, max_epochs=5, seed=7)
    a, ma = train_estimator(pos, neg, settings)
    b, mb = train_estimator(pos, neg, settings)
    c, _ = train_estimator(pos, neg, TrainSettings(model="mlp", hidden=[16], dropout=0.1, max_epochs=5, seed=8))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ma["curve"] == mb["curve"]
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


def test_early_stopping_on_patience_keeps_the_best_epoch():
    pos, neg, _, _ = shifted_gaussians(200, 400)
    settings = TrainSettings(max_epochs=200, patience=2, min_delta=1e-3, lr=1e-2, monitor="val_loss", seed=0)
    _, m = train_estimator(pos, neg, settings)
    assert m["stopped_because"] == "patience" and m["epochs_run"] < 200
    val_losses = [r["val_loss"] for r in m["curve"]]
    assert m["val_loss"] == pytest.approx(val_losses[m["best_epoch"]])
    assert m["best_epoch"] == m["epochs_run"] - 1 - 2  # two epochs without improvement after the best


def separable_sources(seed=0, n=1500, dim=4):
    """VLA around x0 = 3; two pool sources, a hard one just across the boundary (like the
    embodied source) and a far one, displaced along another axis too (like the text-centric one)."""
    rng = np.random.default_rng(seed)

    def blob(x0: float, x1: float) -> np.ndarray:
        b = rng.standard_normal((n, dim)) * 0.3
        b[:, 0] += x0
        b[:, 1] += x1
        return b.astype(np.float32)

    return blob(3.0, 0.0), blob(1.0, 0.0), blob(-1.0, 4.0)


def test_auc_monitor_keeps_the_earliest_epoch_with_the_best_held_out_ranking():
    """On (nearly) separable data the validation loss keeps falling long after the held-out
    ranking has stopped improving: the AUC monitor keeps the earliest best-ranking epoch, the
    loss monitor trains on and pushes every pool score towards 0."""
    pos, hard, far = separable_sources()
    neg = np.concatenate([hard, far])
    by_auc, m_auc = train_estimator(pos, neg, TrainSettings(max_epochs=40, patience=3, seed=0))
    by_loss, m_loss = train_estimator(pos, neg, TrainSettings(max_epochs=40, patience=3, monitor="val_loss", seed=0))
    assert m_auc["monitor"] == "val_auc" and m_loss["monitor"] == "val_loss"
    aucs = [r["val_auc"] for r in m_auc["curve"]]
    best = m_auc["best_epoch"]
    assert m_auc["stopped_because"] == "patience" and m_auc["epochs_run"] == best + 1 + 3
    assert m_auc["val_auc"] == aucs[best] >= max(aucs) - 1e-4  # min_delta
    assert all(a <= aucs[best] + 1e-4 for a in aucs[best + 1 :])
    assert all(a < aucs[best] - 1e-4 for a in aucs[:best])  # earliest: no earlier epoch was as good
    assert m_loss["best_epoch"] > best + 3
    s_auc, s_loss = by_auc.score(neg), by_loss.score(neg)
    assert s_loss.mean() < 0.75 * s_auc.mean()  # trained towards the loss plateau, pool scores fall
    assert s_auc[len(hard):].mean() < s_auc[: len(hard)].mean()  # far source below the hard one


def test_early_stopping_on_target_validation_accuracy():
    pos, neg, _, _ = shifted_gaussians(300, 600)
    _, m = train_estimator(pos, neg, TrainSettings(max_epochs=50, target_val_accuracy=0.6, seed=0))
    assert m["stopped_because"] == "target_val_accuracy"
    assert m["val_accuracy"] >= 0.6 and m["epochs_run"] == m["best_epoch"] + 1
    assert all(r["val_accuracy"] < 0.6 for r in m["curve"][:-1])


def test_balanced_batches_are_half_and_half_and_cover_the_larger_class():
    rng = np.random.default_rng(0)
    batches = list(balanced_batches(10, 37, 8, rng))
    assert all(len(p) == len(n) == 4 for p, n in batches)
    negs = np.concatenate([n for _, n in batches])
    assert set(negs.tolist()) == set(range(37))  # every pool sample is seen in the epoch
    assert set(np.concatenate([p for p, _ in batches]).tolist()) == set(range(10))


def test_save_load_round_trip_and_folded_scoring(tmp_path):
    pos, neg, test, _ = shifted_gaussians(200, 400)
    for kind in ("linear", "mlp"):
        model, metrics = train_estimator(pos, neg, TrainSettings(model=kind, hidden=[8, 4], max_epochs=2, seed=0))
        out = save_estimator(model, tmp_path / kind, {"feature_fingerprint": "abc", "metrics": metrics})
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["kind"] == kind and cfg["dim"] == 8 and cfg["feature_fingerprint"] == "abc"
        loaded = load_estimator(out)
        np.testing.assert_allclose(loaded.score(test), model.score(test), rtol=0, atol=0)
        # the standardiser is saved with the weights
        assert torch.equal(loaded.feature_std, model.feature_std) and not torch.all(model.feature_std == 1)
        # folding the standardiser into the first layer gives the same logits
        h = torch.from_numpy(test).double()
        layers = loaded.folded_layers()
        for i, (w, b) in enumerate(layers):
            h = h @ w.double().T + b.double()
            if i < len(layers) - 1:
                h = h.relu()
        with torch.no_grad():
            np.testing.assert_allclose(h[:, 0].numpy(), loaded(torch.from_numpy(test)).double().numpy(), rtol=1e-4, atol=1e-4)


def test_load_rejects_a_directory_that_is_not_an_estimator(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a proximity estimator"):
        load_estimator(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        ProximityEstimator(4, kind="transformer")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_estimator_weights_file_is_named(tmp_path):
    from midtrain.runs import StageError

    out = save_estimator(ProximityEstimator(4, kind="linear"), tmp_path / "est")
    _truncate(out / "model.safetensors")
    with pytest.raises(StageError, match=rf"^{out / 'model.safetensors'}: damaged weights file"):
        load_estimator(out)
