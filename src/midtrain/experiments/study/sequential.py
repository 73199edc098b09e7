"""Sequential evaluation: episodes in rounds, stop a comparison once it is decided, keep the
false-positive rate at ``alpha``.

Testing after every round at the fixed-sample 1.96 finds a difference between equal rows far
more often than 5% of the time (five looks: about 14%). Group-sequential designs spend ``alpha``
over the looks instead (Lan & DeMets, 1983): with the information fraction ``t_k`` at look ``k``
(here the share of the episode budget evaluated, ``n_k / n_max``) and a spending function
``alpha(t)`` rising from 0 to ``alpha``, the boundary ``c_k`` of look ``k`` solves

    P(|Z_1| < c_1, ..., |Z_{k-1}| < c_{k-1}, |Z_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})

under no difference, where ``Z_k`` are the z-statistics of the accumulating data: Brownian motion
in information time, ``S_k = Z_k sqrt(t_k)`` with independent normal increments of variance
``t_k - t_{k-1}``. The probabilities are computed by the recursive numerical integration of
Armitage, McPherson & Rowe (1969) (Jennison & Turnbull, 2000, ch. 19): the sub-density of
``S_k`` on the continuation region is carried on a grid from look to look. Spending functions:
``obrien_fleming`` ``alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t))`` (almost nothing early, nearly
the full 1.96 at the end) and ``pocock`` ``alpha(t) = alpha log(1 + (e - 1) t)``.

The statistic at a look is ``D / SE(D)`` of the paired difference with the crossed-design
variance of :mod:`midtrain.experiments.study.power`, its Student-t value mapped to a z-score through its
Satterthwaite degrees of freedom (few seeds make ``SE`` uncertain). With training seeds fixed and
episodes added, the seed term of ``Var(D)`` does not shrink, so the true information grows more
slowly than ``n_k``: the looks are more correlated than the boundaries assume, which makes the
procedure conservative (fewer false positives), never the opposite.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

Spending = Literal["obrien_fleming", "pocock"]
GRID_POINTS = 801


def spent_alpha(t: np.ndarray | float, alpha: float = 0.05, spending: Spending = "obrien_fleming") -> np.ndarray:
    """Cumulative ``alpha(t)`` of the spending function at information fractions ``t`` in (0, 1]."""
    from scipy.stats import norm

    t = np.asarray(t, dtype=np.float64)
    if spending == "obrien_fleming":
        return 2 - 2 * norm.cdf(norm.ppf(1 - alpha / 2) / np.sqrt(t))
    if spending == "pocock":
        return alpha * np.log(1 + (math.e - 1) * t)
    raise ValueError(f"spending: unknown spending function {spending!r}; expected obrien_fleming or pocock")


def boundaries(fractions: Sequence[float], alpha: float = 0.05, spending: Spending = "obrien_fleming") -> list[float]:
    """Two-sided z boundaries ``c_k`` of the looks at information ``fractions`` (increasing, in (0, 1]);
    the last look at fraction 1 spends all of ``alpha``."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    t = np.asarray(fractions, dtype=np.float64)
    if t.size == 0 or np.any(t <= 0) or np.any(t > 1) or np.any(np.diff(t) <= 0):
        raise ValueError(f"boundaries: information fractions must increase within (0, 1], got {list(fractions)}")
    cum = spent_alpha(t, alpha, spending)
    out: list[float] = []
    grid = density = None  # S_{k-1} on its continuation region: points and sub-density
    for k, tk in enumerate(t):
        target = float(cum[k] - (cum[k - 1] if k else 0.0))
        if k == 0:
            c = float(norm.isf(target / 2))
            new_grid = np.linspace(-c * math.sqrt(tk), c * math.sqrt(tk), GRID_POINTS)
            new_density = norm.pdf(new_grid, scale=math.sqrt(tk))
        else:
            sd = math.sqrt(tk - t[k - 1])

            def crossing(c: float) -> float:
                b = c * math.sqrt(tk)
                return float(np.trapezoid(density * (norm.cdf((-b - grid) / sd) + norm.sf((b - grid) / sd)), grid))

            c = float(brentq(lambda c: crossing(c) - target, 1e-3, 40.0, xtol=1e-10)) if target > 0 else math.inf
            b = c * math.sqrt(tk) if math.isfinite(c) else 12 * math.sqrt(tk)
            new_grid = np.linspace(-b, b, GRID_POINTS)
            kernel = norm.pdf((new_grid[:, None] - grid[None, :]) / sd) / sd
            new_density = np.trapezoid(kernel * density[None, :], grid, axis=1)
        out.append(c)
        grid, density = new_grid, new_density
    return out


def z_statistic(diffs: Sequence[np.ndarray]) -> float:
    """``D / SE(D)`` of paired differences (per task ``[seeds, episodes]``, :mod:`midtrain.experiments.study.power`)
    as a z-score: the t-value's tail probability at the Satterthwaite degrees of freedom, mapped
    to the normal. 0 when nothing varies."""
    from scipy.stats import norm
    from scipy.stats import t as student_t

    from .power import satterthwaite_df, variance_components

    vc = variance_components(diffs)
    var = vc.variance()
    mean = float(np.mean([np.mean(d) for d in diffs]))
    if var <= 0:
        return 0.0
    tval = mean / math.sqrt(var)
    df = satterthwaite_df(vc)
    if not math.isfinite(df):
        return tval
    return float(math.copysign(norm.isf(student_t.sf(abs(tval), max(df, 1.0))), tval))


def decide(z_values: Sequence[float], fractions: Sequence[float], alpha: float = 0.05,
           spending: Spending = "obrien_fleming") -> dict:  # fmt: skip
    """The sequential decision after the looks so far (``z_values[k]`` at ``fractions[k]``):
    ``{"decided": bool, "look": index of the first crossing or None, "boundaries": [...]}``.
    A comparison is decided (a difference, its sign that of z) at the first look whose ``|z|``
    reaches its boundary; an undecided one at fraction 1 has spent its budget (no difference shown)."""
    if len(z_values) != len(fractions):
        raise ValueError("decide: one z-value per look")
    bounds = boundaries(fractions, alpha, spending)
    for k, (z, c) in enumerate(zip(z_values, bounds)):
        if abs(z) >= c:
            return {"decided": True, "look": k, "sign": int(np.sign(z)), "boundaries": [round(b, 4) for b in bounds]}
    return {"decided": False, "look": None, "sign": 0, "budget_spent": bool(math.isclose(fractions[-1], 1.0)),
            "boundaries": [round(b, 4) for b in bounds]}  # fmt: skip
