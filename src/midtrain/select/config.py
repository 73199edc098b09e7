"""Config of ``midtrain select`` (light imports only, so ``midtrain select --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from ..config import ConfigError, StageConfig, option


@dataclass
class SelectConfig(StageConfig):
    """Selection from ``<run>/score/proximity_scores.parquet`` (or ``scores:``): exactly one of
    ``k`` and ``fraction`` is set. The algorithms (ranking, Gumbel-top-K, floors and caps,
    de-duplication) are described in :mod:`midtrain.select.stage`; the report (MMD to the VLA set
    of the selection and of a random selection of the same K) in :mod:`midtrain.select.report`."""

    k: Optional[int] = option(None, "samples to select (or set `fraction`)")
    fraction: Optional[float] = option(None, "fraction of the eligible pool to select (or set `k`)")
    method: Literal["top_k", "gumbel"] = option(
        "top_k", "top_k: the K best; gumbel: sample K without replacement with probability proportional to exp(w / T)"
    )
    temperature: float = option(1.0, "gumbel: T (small: close to top_k; large: close to uniform)")
    source_floors: dict[str, Union[int, float]] = option(
        factory=dict, help="per-source minimum of the selection: a count, or a fraction of K (rounded up)"
    )
    source_caps: dict[str, Union[int, float]] = option(
        factory=dict, help="per-source maximum of the selection: a count, or a fraction of K (rounded down)"
    )
    pool_sources: list[str] = option(factory=list, help="pool sources eligible for selection (empty: all)")
    vla_sources: list[str] = option(factory=list, help="VLA sources the report compares with (empty: every VLA source)")
    dedup: bool = option(False, "drop samples whose content (text and image bytes) repeats a better-ranked one")
    scores: Optional[Path] = option(None, "score file (default: this run's score/proximity_scores.parquet)")
    features: Optional[Path] = option(None, "features directory for the report's MMD and diversity (default: this run's)")
    report: bool = option(True, "write the selection report: figures, gallery, MMD and diversity metrics")
    gallery_size: int = option(8, "samples shown at each end of the ranking in the report's gallery")
    thumbnail_px: int = option(256, "longest side of the gallery thumbnails, pixels")
    metric_samples: int = option(2000, "rows per set (selection, random, pool, VLA) for the report's MMD and diversity")

    def validate(self) -> None:
        if (self.k is None) == (self.fraction is None):
            raise ConfigError(f"k / fraction: set exactly one (got k={self.k}, fraction={self.fraction})")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k: must be >= 1, got {self.k}")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        for key in ("source_floors", "source_caps"):
            for src, v in getattr(self, key).items():
                if v < 0 or (isinstance(v, float) and v > 1.0):
                    raise ConfigError(f"{key}.{src}: expected a count >= 0 or a fraction in [0, 1], got {v}")
        if self.gallery_size < 0 or self.metric_samples < 2:
            raise ConfigError("gallery_size must be >= 0 and metric_samples >= 2")
