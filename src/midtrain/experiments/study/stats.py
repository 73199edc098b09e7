"""Intervals for a study's numbers, and why these.

**Closed-loop success** of a row is a mean over a *crossed* design: ``S`` training seeds (one
policy each) x the evaluation episodes of each task, whose initial states are the *same* for
every seed and every row (``eval.seed``). Two sources of chance move it: which policy training
produced (seed) and which initial states were drawn (episode). A Wilson interval on the pooled
episodes sees only the second and treats S policies as one; a t-interval on the S seed means sees
only the first (the states are shared, so their draw moves every seed mean together) and with
S = 3 has 2 degrees of freedom. So the 95% interval here is a **two-way (crossed) bootstrap**:
each replicate redraws the seeds with replacement and, independently, the episodes of every task
with replacement (tasks are fixed: the mean over tasks is the estimand), and recomputes

    success = mean_t [ sum_{s,e} w_s w_te y_ste / (S E_t) ]

with multinomial counts ``w``. It is the percentile interval of 10,000 replicates. The crossed
bootstrap counts the seed x episode interaction in both margins, so it is slightly conservative
(McCullagh, 2000), which is the safe side for a claim that one row beats another.

**Differences between rows** are paired: the same seeds (index for index) and the same episodes,
so the same replicate weights apply to both rows and the interval is that of the replicate
differences - far tighter than comparing two marginal intervals when rows succeed on the same
easy states. With one seed the same code is an episode bootstrap (the seed term vanishes).

**Offline numbers** (held-out action error, probe error) are one number per seed: mean and a
Student-t 95% interval over seeds (none with one seed).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

BOOTSTRAP_REPLICATES = 10_000
INTERVAL_METHOD = ("two-way bootstrap over training seeds and evaluation episodes (tasks fixed), "
                   "95% percentile, 10,000 replicates; paired across rows")  # fmt: skip


def success_array(per_seed: Sequence[dict[str, Sequence[bool]]]) -> tuple[list[str], list[np.ndarray]]:
    """``[{task: [success of episode 0, 1, ...]}, ...]`` (one dict per seed, episodes in index order)
    -> (tasks, per task an array ``[S, E_t]`` of 0/1). Every seed must have the same tasks and episodes."""
    if not per_seed:
        raise ValueError("success_array: no seed")
    tasks = list(per_seed[0])
    arrays = []
    for t in tasks:
        rows = [np.asarray(s[t], dtype=np.float64) if t in s else None for s in per_seed]
        if any(r is None or len(r) != len(rows[0]) for r in rows) or len(rows[0]) == 0:
            raise ValueError(f"success_array: task {t!r} has different episodes across seeds; every seed must run the same protocol")
        arrays.append(np.stack(rows))
    if any(set(s) != set(tasks) for s in per_seed):
        raise ValueError("success_array: seeds evaluated different tasks")
    return tasks, arrays


def _weights(rng: np.random.Generator, n: int, reps: int) -> np.ndarray:
    """Multinomial resampling counts ``[reps, n]`` (each row sums to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)


def replicate_means(arrays: list[np.ndarray], w_seed: np.ndarray, w_episodes: list[np.ndarray]) -> np.ndarray:
    """The mean over tasks of each bootstrap replicate, from resampling counts: ``w_seed`` ``[B, S]``
    (how often each seed is drawn) and per task ``w_episodes[t]`` ``[B, E_t]``; ``arrays[t]`` is
    ``[S, E_t]``. Equal to recomputing the mean on explicitly resampled seeds and episodes."""
    n_seeds = arrays[0].shape[0]
    per_task = [np.einsum("bs,se,be->b", w_seed, y, w) / (n_seeds * y.shape[1]) for y, w in zip(arrays, w_episodes)]
    return np.mean(per_task, axis=0)


def bootstrap_means(arrays: list[np.ndarray], seed: int = 0, reps: int = BOOTSTRAP_REPLICATES) -> np.ndarray:
    """Replicates ``[reps]`` of the two-way bootstrap (module docstring). Rows compared with
    :func:`paired_interval` use the same ``seed``, hence the same resampling counts."""
    rng = np.random.default_rng(seed)
    w_seed = _weights(rng, arrays[0].shape[0], reps)
    return replicate_means(arrays, w_seed, [_weights(rng, y.shape[1], reps) for y in arrays])


def percentile_interval(replicates: np.ndarray) -> list[float]:
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def success_summary(per_seed: Sequence[dict[str, Sequence[bool]]], seed: int = 0) -> dict:
    """Mean success over tasks (and seeds) with its interval, per-seed means and per-task means."""
    tasks, arrays = success_array(per_seed)
    point = float(np.mean([y.mean() for y in arrays]))
    reps = bootstrap_means(arrays, seed)
    seed_means = [float(np.mean([y[s].mean() for y in arrays])) for s in range(arrays[0].shape[0])]
    return {
        "mean": round(point, 4), "ci95": percentile_interval(reps), "interval": INTERVAL_METHOD,
        "per_seed": [round(m, 4) for m in seed_means],
        "per_task": {t: round(float(y.mean()), 4) for t, y in zip(tasks, arrays)},
        "episodes": int(sum(y.size for y in arrays)), "successes": int(sum(y.sum() for y in arrays)),
    }  # fmt: skip


def paired_arrays(row: Sequence[dict[str, Sequence[bool]]], base: Sequence[dict[str, Sequence[bool]]]
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
    """:func:`success_array` of two rows compared pair by pair (the same tasks, seeds and episodes)."""
    t_row, a_row = success_array(row)
    t_base, a_base = success_array(base)
    if t_row != t_base or [a.shape for a in a_row] != [a.shape for a in a_base]:
        raise ValueError("paired comparison: the rows were not evaluated under the same protocol and seeds")
    return a_row, a_base


def paired_interval(row: Sequence[dict[str, Sequence[bool]]], base: Sequence[dict[str, Sequence[bool]]],
                    seed: int = 0) -> dict:  # fmt: skip
    """The difference ``row - base`` of mean success, paired by seed index and episode, with its
    two-way bootstrap interval (the same replicate weights for both)."""
    a_row, a_base = paired_arrays(row, base)
    diff = bootstrap_means(a_row, seed) - bootstrap_means(a_base, seed)
    point = float(np.mean([y.mean() for y in a_row]) - np.mean([y.mean() for y in a_base]))
    return {"mean": round(point, 4), "ci95": percentile_interval(diff),
            "share_of_replicates_above_0": round(float(np.mean(diff > 0)), 4)}  # fmt: skip


def t_interval(values: Sequence[float], bounds: tuple[Optional[float], Optional[float]] = (None, None)) -> dict:
    """Mean of per-seed values with a Student-t 95% interval (``ci95`` None for one value), clipped
    to ``bounds`` (the quantity's range: an accuracy's interval over 2 seeds easily leaves [0, 1]);
    ``values`` are the seeds' own numbers, which say more than the interval with few seeds."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(np.mean(vals))
    if len(vals) < 2:
        return {"mean": round(mean, 5), "ci95": None, "n": 1, "values": [round(v, 5) for v in vals]}
    from scipy.stats import t

    half = float(t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / math.sqrt(len(vals)))
    lo, hi = mean - half, mean + half
    clipped = (bounds[0] is not None and lo < bounds[0]) or (bounds[1] is not None and hi > bounds[1])
    lo = lo if bounds[0] is None else max(lo, bounds[0])
    hi = hi if bounds[1] is None else min(hi, bounds[1])
    return {"mean": round(mean, 5), "ci95": [round(lo, 5), round(hi, 5)], "n": len(vals),
            "values": [round(v, 5) for v in vals], "clipped": clipped}  # fmt: skip
