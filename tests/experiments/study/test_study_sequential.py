"""Sequential evaluation: the alpha-spending boundaries against published values and simulated
Brownian motion, and the whole procedure on 2,000 simulated studies of equal rows - its false
positives stay at 5% where testing every round at 1.96 does not."""

from __future__ import annotations

import numpy as np
import pytest

from midtrain.experiments.study.sequential import boundaries, decide, spent_alpha, z_statistic

LOOKS = [0.2, 0.4, 0.6, 0.8, 1.0]


def test_pocock_boundaries_match_the_published_table():
    """Lan-DeMets Pocock-type spending, 5 equally spaced looks, two-sided 5% (the values R's gsDesign
    and ldbounds give): 2.438, 2.427, 2.410, 2.397, 2.386."""
    assert boundaries(LOOKS, spending="pocock") == pytest.approx([2.438, 2.427, 2.410, 2.397, 2.386], abs=2e-3)
    assert boundaries([1.0]) == pytest.approx([1.959964], abs=1e-5)  # one look: the fixed-sample test


def test_boundaries_spend_alpha_as_promised_on_brownian_motion():
    """The share of simulated null paths first crossing by look k is alpha(t_k)."""
    rng = np.random.default_rng(0)
    t = np.asarray(LOOKS)
    paths = np.cumsum(rng.normal(size=(400_000, 5)) * np.sqrt(np.diff(np.r_[0.0, t])), axis=1) / np.sqrt(t)
    for spending in ("obrien_fleming", "pocock"):
        crossed = np.abs(paths) >= np.asarray(boundaries(LOOKS, spending=spending))
        first = np.where(crossed.any(axis=1), crossed.argmax(axis=1), 99)
        cumulative = [np.mean(first <= k) for k in range(5)]
        assert cumulative == pytest.approx(spent_alpha(t, spending=spending), abs=1.5e-3)
    ob = boundaries(LOOKS)
    assert ob[0] > 4 and ob == sorted(ob, reverse=True) and 1.96 < ob[-1] < 2.1  # little spent early


def test_decide_stops_at_the_first_crossing():
    out = decide([1.0, 3.5, 5.0], [0.2, 0.4, 0.6])
    assert out["decided"] and out["look"] == 1 and out["sign"] == 1
    undecided = decide([0.5, -1.0, 2.0, 1.5, 1.99], LOOKS)
    assert not undecided["decided"] and undecided["budget_spent"]  # 1.99 < 2.06: the budget is spent, nothing shown
    with pytest.raises(ValueError, match="increase"):
        boundaries([0.5, 0.4])


def _equal_rows(rng, n, seeds, tasks, episodes, seed_half=0.15, base_half=0.2, episode_half=0.1):
    """Paired differences of two rows from the same distribution: each training seed shifts its
    row's success probability, each initial state shifts both rows (b) and each row alone (c)."""
    q = rng.uniform(0.3, 0.7, (n, 1, tasks, 1))
    b = rng.uniform(-base_half, base_half, (n, 1, tasks, episodes))
    rows = []
    for _ in range(2):
        a = rng.uniform(-seed_half, seed_half, (n, seeds, 1, 1))
        c = rng.uniform(-episode_half, episode_half, (n, 1, tasks, episodes))
        rows.append(rng.random((n, seeds, tasks, episodes)) < np.clip(q + a + b + c, 0, 1))
    return rows[0].astype(np.float64) - rows[1]


def test_false_positives_of_equal_rows_stay_at_5_percent_where_naive_repeated_tests_do_not():
    """2,000 studies, 3 seeds x 2 tasks, episodes in 5 rounds of 10 per task, rows equal: the
    alpha-spending procedure finds a difference in at most 5% of them (+2.5 binomial sd), testing
    every round at 1.96 in the same studies in clearly more."""
    n, seeds, tasks, per_round = 2000, 3, 2, 10
    d = _equal_rows(np.random.default_rng(1), n, seeds, tasks, 5 * per_round)
    z = np.array([[z_statistic([d[i, :, t, : (k + 1) * per_round] for t in range(tasks)]) for k in range(5)]
                  for i in range(n)])  # fmt: skip
    sequential = float(np.mean((np.abs(z) >= boundaries(LOOKS)).any(axis=1)))
    naive = float(np.mean((np.abs(z) >= 1.959964).any(axis=1)))
    tolerance = 2.5 * np.sqrt(0.05 * 0.95 / n)
    assert sequential <= 0.05 + tolerance, sequential
    assert naive > 0.05 + tolerance and naive > 1.5 * sequential, (naive, sequential)
