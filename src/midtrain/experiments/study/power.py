"""How small a difference between two rows a study can detect, from the study's own variance.

Notation. Two rows are compared on the same ``S`` training seeds (index for index) and, per task
``t`` of ``T``, the same ``E_t`` episodes (initial states). The paired difference of episode
``e`` of task ``t`` under seed ``s`` is ``d_ste = y^A_ste - y^B_ste`` (each ``y`` is 0/1), and the
estimate is ``D = mean_t mean_{s,e} d_ste``. Per task, a crossed random-effects model

    d_ste = delta_t + a_st + b_te + r_ste

has a seed effect ``a`` (which policy each row's training produced), an episode effect ``b``
(initial states on which one row is luckier than the other: what pairing does not cancel) and a
residual ``r`` (the seed x episode interaction and the Bernoulli draw). The seed effects of one
seed are shared across tasks, so what reaches ``D`` is the seed effect of the task mean,
``sigma_s^2 = Var(mean_t a_st)``; episode effects of different tasks are independent. Hence

    Var(D) = sigma_s^2 / S + (1/T^2) sum_t [ sigma_e,t^2 / E_t + sigma_r,t^2 / (S E_t) ].

The components are estimated by the method of moments of the two-way layout (balanced ANOVA,
truncated at 0; ``Var(D)`` of the study's own layout is the untruncated, unbiased combination of
the mean squares): ``sigma_r,t^2`` = the interaction mean square of task ``t``; ``sigma_e,t^2`` =
the variance over episodes of the seed-averaged differences minus ``sigma_r,t^2 / S``;
``sigma_s^2`` = the variance over seeds of the seed means of ``D`` minus
``(1/T^2) sum_t sigma_r,t^2 / E_t`` (episode effects are shared by the seeds, so they do not move
the seed means apart). One seed leaves ``sigma_s^2`` unknown (taken as 0: the result is then a
lower bound, and says so).

**Minimum detectable difference** at power ``1 - beta`` for a two-sided test of level ``alpha``
(a Wald test of ``D / SE(D)``): ``MDD = (z_{1-alpha/2} + z_{1-beta}) SE(D)``. Two rows that
agree on every episode have ``SE = 0``, yet a true difference ``delta`` of 0/1 outcomes moves at
least a share ``delta`` of the pairs, whose variance is then at least ``delta (1 - delta)`` per
pair; the MDD is therefore never below the root of ``delta = z sqrt(delta (1 - delta) c)``,
``c = (1/T^2) sum_t 1 / (S E_t)``: ``delta_min = z^2 c / (1 + z^2 c)``.

**Designs for a target difference**: the same components give ``Var(D)`` for any ``S'`` seeds and
``E'`` episodes per task, so the smallest ``E'`` with ``MDD <= target`` follows for each ``S'``
(none when the seed term alone is too large: more episodes cannot buy what more seeds must).

:func:`satterthwaite_df` gives the degrees of freedom of ``SE(D)^2`` (a combination of mean
squares), which :mod:`midtrain.experiments.study.sequential` uses to turn ``D / SE`` into a z-score with few
seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

METHOD = ("crossed seeds x episodes variance components of the paired differences (method of moments), "
          "Wald test, normal quantiles")  # fmt: skip


@dataclass
class VarianceComponents:
    """The estimated components of a paired difference (module docstring) and the layout they came from."""

    seed: float  # sigma_s^2: the seed effect of the task mean
    episode: list[float]  # sigma_e,t^2 per task
    residual: list[float]  # sigma_r,t^2 per task
    seeds: int  # S
    episodes: list[int]  # E_t per task
    mean_squares: dict  # the raw mean squares (for satterthwaite_df)
    notes: list[str]
    unbiased: float = 0.0  # Var(D) of the study's own layout from the untruncated mean squares

    def variance(self, seeds: Optional[int] = None, episodes: Optional[Sequence[int]] = None) -> float:
        """``Var(D)`` with ``seeds`` seeds and ``episodes[t]`` episodes per task. The study's own layout
        (the default) uses the unbiased combination of mean squares (falling back to the components
        when it is not positive); another layout, the components (truncated at 0, so slightly
        conservative)."""
        if seeds is None and episodes is None and self.unbiased > 0:
            return self.unbiased
        s = self.seeds if seeds is None else seeds
        e = self.episodes if episodes is None else list(episodes)
        t = len(self.episode)
        within = sum(ve / n + vr / (s * n) for ve, vr, n in zip(self.episode, self.residual, e))
        return self.seed / s + within / t**2

    def to_dict(self) -> dict:
        return {"seed": _r(self.seed), "episode": [_r(v) for v in self.episode],
                "residual": [_r(v) for v in self.residual]}  # fmt: skip


def _r(x: float) -> float:
    return round(float(x), 6)


def variance_components(diffs: Sequence[np.ndarray]) -> VarianceComponents:
    """Components of ``diffs`` (per task an array ``[S, E_t]`` of paired differences, the same ``S``)."""
    if not diffs or any(np.ndim(d) != 2 for d in diffs) or len({d.shape[0] for d in diffs}) != 1:
        raise ValueError("variance_components: expected per task an array [seeds, episodes] with the same seeds")
    n_seeds, n_tasks = diffs[0].shape[0], len(diffs)
    notes: list[str] = []
    episode, residual, ms_episode, ms_interaction = [], [], [], []
    for d in diffs:
        d = np.asarray(d, dtype=np.float64)
        n_eps = d.shape[1]
        if n_seeds >= 2 and n_eps >= 2:
            inter = d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()
            ms_int = float((inter**2).sum() / ((n_seeds - 1) * (n_eps - 1)))
        else:
            ms_int = 0.0  # not separable from the episode (one seed) or seed (one episode) term
        ms_ep = float(np.var(d.mean(axis=0), ddof=1)) if n_eps >= 2 else 0.0
        ms_episode.append(ms_ep)
        ms_interaction.append(ms_int)
        residual.append(ms_int)
        episode.append(max(0.0, ms_ep - ms_int / n_seeds))
    if n_seeds == 1:
        notes.append("one seed: the seed variance is not estimable and is taken as 0 (the detectable difference is a lower bound)")
    if any(d.shape[1] < 2 for d in diffs):
        notes.append("a task with one episode: its episode variance is not estimable and is taken as 0")
    seed_means = np.mean([np.asarray(d, dtype=np.float64).mean(axis=1) for d in diffs], axis=0)
    ms_seed = float(np.var(seed_means, ddof=1)) if n_seeds >= 2 else 0.0
    shared = sum(r / d.shape[1] for r, d in zip(residual, diffs)) / n_tasks**2
    n_eps = [d.shape[1] for d in diffs]
    unbiased = ms_seed / n_seeds + sum(m_ep / n - m_int / (n_seeds * n)
                                       for n, m_ep, m_int in zip(n_eps, ms_episode, ms_interaction)) / n_tasks**2  # fmt: skip
    return VarianceComponents(
        seed=max(0.0, ms_seed - shared), episode=episode, residual=residual, seeds=n_seeds, episodes=n_eps, notes=notes,
        mean_squares={"seed": ms_seed, "episode": ms_episode, "interaction": ms_interaction}, unbiased=unbiased,
    )  # fmt: skip


def satterthwaite_df(vc: VarianceComponents) -> float:
    """Degrees of freedom of the untruncated ``Var(D)`` estimate
    ``ms_seed / S + (1/T^2) sum_t [ms_ep,t / E_t - ms_int,t / (S E_t)]`` (Satterthwaite, 1946);
    ``inf`` when it is 0 (nothing varies)."""
    s, t, ms = vc.seeds, len(vc.episodes), vc.mean_squares
    terms = [(ms["seed"] / s, s - 1)]
    for n, m_ep, m_int in zip(vc.episodes, ms["episode"], ms["interaction"]):
        terms += [(m_ep / (t**2 * n), n - 1), (-m_int / (t**2 * s * n), (s - 1) * (n - 1))]
    total = sum(c for c, _ in terms)
    denom = sum(c * c / df for c, df in terms if df > 0 and c != 0)
    return float("inf") if denom == 0 or total <= 0 else total * total / denom


def z_sum(power: float = 0.8, alpha: float = 0.05) -> float:
    """``z_{1-alpha/2} + z_{power}``: the MDD in standard errors."""
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def minimum_detectable_difference(vc: VarianceComponents, power: float = 0.8, alpha: float = 0.05,
                                  seeds: Optional[int] = None, episodes: Optional[Sequence[int]] = None) -> float:  # fmt: skip
    """The MDD (module docstring), with the 0/1 floor, for the study's layout or another one."""
    z = z_sum(power, alpha)
    s = vc.seeds if seeds is None else seeds
    e = vc.episodes if episodes is None else list(episodes)
    c = sum(1.0 / (s * n) for n in e) / len(e) ** 2
    return max(z * math.sqrt(vc.variance(s, e)), z * z * c / (1 + z * z * c))


def episodes_for_target(vc: VarianceComponents, target: float, seeds: int, power: float = 0.8, alpha: float = 0.05,
                        max_episodes: int = 100_000) -> Optional[int]:  # fmt: skip
    """The fewest episodes per task (the same for every task) with MDD <= ``target`` at ``seeds``
    seeds; None when no number up to ``max_episodes`` reaches it."""
    z = z_sum(power, alpha)
    t = len(vc.episode)
    allowed = (target / z) ** 2 - vc.seed / seeds
    if allowed <= 0:
        return None
    per_episode = (sum(vc.episode) + sum(vc.residual) / seeds) / t**2
    floor = z * z * (1 - target) / (target * t * seeds)  # the 0/1 floor: T S E >= z^2 (1 - d) / d
    n = max(1, math.ceil(per_episode / allowed - 1e-9), math.ceil(floor - 1e-9))
    while minimum_detectable_difference(vc, power, alpha, seeds, [n] * t) > target + 1e-12 and n <= max_episodes:
        n += 1  # rounding only: the bound above is exact up to it
    return n if n <= max_episodes else None


def power_summary(diffs: Sequence[np.ndarray], target: float, power: float = 0.8, alpha: float = 0.05,
                  seed_counts: Sequence[int] = (2, 3, 5, 10)) -> dict:  # fmt: skip
    """``minimum_detectable_difference`` of a study.json comparison: the MDD of this layout, its
    standard error and components, and per seed count the episodes per task that reach ``target``."""
    vc = variance_components(diffs)
    t = len(vc.episodes)
    designs = []
    for s in sorted(set(seed_counts) | {vc.seeds}):
        n = episodes_for_target(vc, target, s, power, alpha)
        designs.append({"seeds": s, "episodes_per_task": n, "episodes_per_row": None if n is None else s * n * t})
    reachable = [d for d in designs if d["episodes_per_row"] is not None]
    return {
        "value": round(minimum_detectable_difference(vc, power, alpha), 4), "power": power, "alpha": alpha,
        "standard_error": round(math.sqrt(vc.variance()), 4), "seeds": vc.seeds, "episodes_per_task": vc.episodes,
        "variance_components": vc.to_dict(), "target_difference": target, "to_reach_target": designs,
        "cheapest_for_target": min(reachable, key=lambda d: d["episodes_per_row"]) if reachable else None,
        "method": METHOD, "notes": vc.notes,
    }  # fmt: skip


def comparison_power(row: Sequence[dict], other: Sequence[dict], target: float, power: float = 0.8,
                     alpha: float = 0.05, seed_counts: Sequence[int] = (2, 3, 5, 10)) -> dict:  # fmt: skip
    """:func:`power_summary` of ``row - other``, each ``[{task: [success of episode 0, 1, ...]}, ...]``
    (one dict per seed, as :func:`midtrain.experiments.study.stats.paired_interval` takes them)."""
    from .stats import paired_arrays

    a_row, a_other = paired_arrays(row, other)
    return power_summary([a - b for a, b in zip(a_row, a_other)], target, power, alpha, seed_counts)
