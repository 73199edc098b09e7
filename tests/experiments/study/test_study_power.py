"""The minimum detectable difference: its components against layouts whose components are known
exactly, the one-seed case against the textbook paired formula, and its promise (80% power at a
true difference equal to it) against simulated studies of 0/1 episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from midtrain.experiments.study.power import (episodes_for_target, minimum_detectable_difference, power_summary,
                                  satterthwaite_df, variance_components, z_sum)  # fmt: skip

Z = norm.ppf(0.975) + norm.ppf(0.8)


def test_additive_layout_gives_its_components_exactly():
    """d_se = a_s + b_e with no interaction: the seed and episode variances are those of a and b."""
    a, b = np.array([0.3, -0.1, 0.2]), np.array([0.0, 0.5, -0.5, 0.25, 1.0])
    vc = variance_components([a[:, None] + b[None, :]])
    assert vc.residual == [pytest.approx(0.0, abs=1e-15)]
    assert vc.seed == pytest.approx(np.var(a, ddof=1)) and vc.episode == [pytest.approx(np.var(b, ddof=1))]
    assert vc.variance() == pytest.approx(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 5)
    # two tasks sharing the seed effect: the seed term is that of the task mean, episodes are per task
    vc2 = variance_components([a[:, None] + b[None, :], a[:, None] - b[None, :2]])
    assert vc2.seed == pytest.approx(np.var(a, ddof=1))
    assert vc2.variance() == pytest.approx(np.var(a, ddof=1) / 3 + (np.var(b, ddof=1) / 5 + np.var(b[:2], ddof=1) / 2) / 4)


def test_one_seed_one_task_is_the_paired_textbook_formula():
    """One seed: MDD = (z_.975 + z_.8) sd(d) / sqrt(n), and the episodes for a target are the
    paired-design sample size ((z_.975 + z_.8) sd(d) / target)^2, rounded up."""
    rng = np.random.default_rng(0)
    d = rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=(1, 60))
    vc = variance_components([d])
    sd = float(np.std(d, ddof=1))
    assert z_sum() == pytest.approx(Z)
    assert minimum_detectable_difference(vc) == pytest.approx(Z * sd / math.sqrt(60))
    assert "lower bound" in vc.notes[0]
    assert episodes_for_target(vc, 0.1, seeds=1) == math.ceil((Z * sd / 0.1) ** 2)
    summary = power_summary([d], target=0.1, seed_counts=(1,))
    assert summary["to_reach_target"] == [{"seeds": 1, "episodes_per_task": math.ceil((Z * sd / 0.1) ** 2),
                                           "episodes_per_row": math.ceil((Z * sd / 0.1) ** 2)}]  # fmt: skip


def test_rows_that_agree_everywhere_still_have_a_floor():
    """Zero observed variance (both rows fail every episode) does not claim a 0-point MDD: a 0/1
    difference d needs at least d(1-d) variance per pair."""
    vc = variance_components([np.zeros((2, 2)), np.zeros((2, 2))])
    c = 1 / 8  # (1/T^2) sum_t 1/(S E_t) with S = E = T = 2
    assert minimum_detectable_difference(vc) == pytest.approx(Z * Z * c / (1 + Z * Z * c))
    assert 0.45 < minimum_detectable_difference(vc) < 0.55
    n = episodes_for_target(vc, 0.1, seeds=2)
    assert minimum_detectable_difference(vc, seeds=2, episodes=[n, n]) <= 0.1
    assert minimum_detectable_difference(vc, seeds=2, episodes=[n - 1, n - 1]) > 0.1


def test_seed_variance_cannot_be_bought_with_episodes():
    vc = variance_components([np.array([[0.4] * 10, [-0.4] * 10])])  # all the variance is between the 2 seeds
    assert vc.seed == pytest.approx(0.32) and episodes_for_target(vc, 0.1, seeds=2) is None
    summary = power_summary([np.array([[0.4] * 10, [-0.4] * 10])], target=0.1, seed_counts=(2, 400))
    assert summary["to_reach_target"][0]["episodes_per_task"] is None
    assert summary["cheapest_for_target"]["seeds"] == 400


# --------------------------------------------------------------------------- simulated studies

SEED_HALF, BASE_HALF, EPISODE_HALF = 0.08, 0.2, 0.1  # half-widths of uniform effects on the success probability


def _true_variance(delta: float, seeds: int, episodes: int, tasks: int, q: float = 0.5) -> float:
    """Var(D) of the generative model below, from its exact components."""
    v_seed, v_base, v_ep = SEED_HALF**2 / 3, BASE_HALF**2 / 3, EPISODE_HALF**2 / 3
    bernoulli = lambda m, v: m - (v + m * m)  # E p(1-p) for p with mean m, variance v
    residual = bernoulli(q + delta, v_seed + v_base + v_ep) + bernoulli(q, v_seed + v_base)
    return 2 * v_seed / seeds + (v_ep / episodes + residual / (seeds * episodes)) / tasks


def _simulate(rng, n_studies: int, delta: float, seeds: int, episodes: int, tasks: int) -> list[list[np.ndarray]]:
    """Paired differences of two rows: each training seed shifts its row's success probability
    (a^A, a^B), each initial state shifts both rows (b, cancelled by pairing) and row A alone (c)."""
    a_a = rng.uniform(-SEED_HALF, SEED_HALF, (n_studies, seeds, 1, 1))
    a_b = rng.uniform(-SEED_HALF, SEED_HALF, (n_studies, seeds, 1, 1))
    b = rng.uniform(-BASE_HALF, BASE_HALF, (n_studies, 1, tasks, episodes))
    c = rng.uniform(-EPISODE_HALF, EPISODE_HALF, (n_studies, 1, tasks, episodes))
    y_a = rng.random((n_studies, seeds, tasks, episodes)) < 0.5 + delta + a_a + b + c
    y_b = rng.random((n_studies, seeds, tasks, episodes)) < 0.5 + a_b + b
    d = y_a.astype(np.float64) - y_b
    return [[d[i, :, t, :] for t in range(tasks)] for i in range(n_studies)]


def test_a_true_difference_equal_to_the_mdd_is_detected_80_percent_of_the_time():
    """2,000 simulated studies (10 seeds x 40 episodes x 2 tasks) whose true difference is the MDD
    of the model's exact components: the Wald test on each study's own estimated variance rejects
    in 80% of them (binomial sd 0.9 points), and the estimated variance is unbiased. Ignoring the
    seed term (0.4 of the variance) would put the power near 0.6."""
    seeds, episodes, tasks, n = 10, 40, 2, 2000
    delta = 0.1
    for _ in range(20):  # the residual depends on delta: fixed point
        delta = Z * math.sqrt(_true_variance(delta, seeds, episodes, tasks))
    studies = _simulate(np.random.default_rng(7), n, delta, seeds, episodes, tasks)
    est, var = np.empty(n), np.empty(n)
    for i, diffs in enumerate(studies):
        est[i] = np.mean([d.mean() for d in diffs])
        var[i] = variance_components(diffs).variance()
    power = float(np.mean(np.abs(est) / np.sqrt(var) > norm.ppf(0.975)))
    assert 0.76 <= power <= 0.84, power
    assert np.mean(var) == pytest.approx(np.var(est), rel=0.1)
    assert np.mean(var) == pytest.approx(_true_variance(delta, seeds, episodes, tasks), rel=0.1)
    # each study's own MDD is centred on the true one
    mdds = [minimum_detectable_difference(variance_components(s)) for s in studies[:300]]
    assert np.median(mdds) == pytest.approx(delta, rel=0.1)


def test_satterthwaite_df_is_the_seed_df_when_seeds_dominate():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1.0, size=(4, 1))
    d = a + rng.normal(0, 0.01, size=(4, 200))  # nearly all the variance between 4 seeds
    assert satterthwaite_df(variance_components([d])) == pytest.approx(3.0, rel=0.05)
    assert satterthwaite_df(variance_components([np.zeros((3, 4))])) == math.inf
