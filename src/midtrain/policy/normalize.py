"""Per-dimension normalisation of actions and proprioceptive state, stored with the policy.

Heads learn on a normalised scale and the policy answers in the dataset's units. For one
dimension with statistics from the training frames:

- ``mean_std``:  y = (x - mean) / (std + eps)                 (unit variance, as LeRobot's MEAN_STD)
- ``min_max``:   y = 2 (x - min) / (max - min) - 1            (to [-1, 1])
- ``q01_q99``:   y = 2 (x - q01) / (q99 - q01) - 1            (to [-1, 1] for the central 98 %;
                 outliers land outside, as in LeRobot's QUANTILES / pi0's q01/q99)

A zero denominator (a constant dimension) is replaced by ``eps`` (1e-8), both ways, so
``unnormalize(normalize(x)) == x`` up to float rounding for every mode.

**Gripper dimensions** listed in ``gripper_dims`` can be *binarised*: their target is
``x > threshold`` (threshold = the midpoint of the dimension's min and max in the data), learned
with BCE by the ``mlp`` head and as ``{-1, +1}`` by the ``flow`` and ``tokens`` heads; a predicted
"closed" becomes the dimension's max, "open" its min, in dataset units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

NormMode = Literal["mean_std", "min_max", "q01_q99"]
NORM_MODES = ("mean_std", "min_max", "q01_q99")
EPS = 1e-8
STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


def compute_stats(values: np.ndarray) -> dict[str, list[float]]:
    """Per-dimension ``mean, std, min, max, q01, q99`` of ``[N, D]`` values (float64 arithmetic)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or len(v) == 0:
        raise ValueError(f"compute_stats: expected a non-empty [N, D] array, got shape {v.shape}")
    q01, q99 = np.quantile(v, [0.01, 0.99], axis=0)
    out = {"mean": v.mean(0), "std": v.std(0), "min": v.min(0), "max": v.max(0), "q01": q01, "q99": q99}
    return {k: [float(x) for x in a] for k, a in out.items()}


@dataclass
class Normalizer:
    """Affine per-dimension map ``y = (x - offset) / scale`` for one of :data:`NORM_MODES`.

    ``stats``: per-dimension lists (see :func:`compute_stats`). ``gripper_dims`` (indices) are
    binarised when ``binarize_gripper``. Works on numpy arrays and torch tensors of shape
    ``[..., D]``.
    """

    mode: str
    stats: dict[str, list[float]]
    gripper_dims: list[int] = field(default_factory=list)
    binarize_gripper: bool = False

    def __post_init__(self) -> None:
        if self.mode not in NORM_MODES:
            raise ValueError(f"normalization: expected one of {', '.join(NORM_MODES)}, got {self.mode!r}")
        missing = [k for k in STAT_KEYS if k not in self.stats]
        if missing:
            raise ValueError(f"normalization stats: missing {missing}")
        stats = {k: np.asarray(self.stats[k], dtype=np.float64) for k in STAT_KEYS}
        self.dim = len(stats["mean"])
        bad = [d for d in self.gripper_dims if not 0 <= d < self.dim]
        if bad:
            raise ValueError(f"gripper_dims: {bad} out of range for {self.dim} dimensions")
        if self.mode == "mean_std":
            offset, scale = stats["mean"], stats["std"] + EPS
        else:
            lo, hi = (stats["min"], stats["max"]) if self.mode == "min_max" else (stats["q01"], stats["q99"])
            width = np.where(hi - lo == 0, EPS, hi - lo)
            offset, scale = lo + width / 2, width / 2
        self.offset, self.scale = offset, scale
        self.threshold = (stats["min"] + stats["max"]) / 2
        self.low, self.high = stats["min"], stats["max"]
        self.binary = np.zeros(self.dim, dtype=bool)
        if self.binarize_gripper:
            self.binary[self.gripper_dims] = True

    @property
    def continuous(self) -> np.ndarray:
        return ~self.binary

    def _consts(self, x, *arrays):
        if isinstance(x, np.ndarray):
            return [a.astype(x.dtype if x.dtype.kind == "f" else np.float64) for a in arrays]
        import torch

        return [torch.as_tensor(a, dtype=x.dtype, device=x.device) for a in arrays]

    def normalize(self, x):
        """Dataset units -> normalised; binarised dims -> ``{0, 1}`` (1 = above the threshold)."""
        offset, scale, thr = self._consts(x, self.offset, self.scale, self.threshold)
        y = (x - offset) / scale
        if self.binary.any():
            y = _where(x, self.binary, (x > thr) * 1.0, y)
        return y

    def unnormalize(self, y):
        """Normalised -> dataset units. Binarised dims take a probability/indicator in [0, 1]:
        > 0.5 gives the dimension's max, else its min."""
        offset, scale, low, high = self._consts(y, self.offset, self.scale, self.low, self.high)
        x = y * scale + offset
        if self.binary.any():
            x = _where(y, self.binary, low + (y > 0.5) * (high - low), x)
        return x

    def to_dict(self) -> dict:
        return {"mode": self.mode, "stats": self.stats, "gripper_dims": list(self.gripper_dims),
                "binarize_gripper": self.binarize_gripper}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> "Normalizer":
        return cls(data["mode"], data["stats"], list(data.get("gripper_dims", [])), bool(data.get("binarize_gripper", False)))


def _where(like, dims: np.ndarray, a, b):
    """Per-dimension select: ``a`` on the dims marked in ``dims``, ``b`` elsewhere (numpy or torch)."""
    if isinstance(like, np.ndarray):
        return np.where(dims, a, b).astype(b.dtype, copy=False)
    import torch

    mask = torch.as_tensor(dims, device=like.device)
    return torch.where(mask, a.to(b.dtype), b)
