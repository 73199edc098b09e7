"""Config of ``midtrain gap`` (light imports only, so ``midtrain gap --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, Device, StageConfig, option


@dataclass
class GapConfig(StageConfig):
    """Config of ``midtrain gap``: which datasets, how many points each, the RBF kernel and MMD
    estimator (these decide the numbers), the memory and threads they take (throughput), and the
    t-SNE map. Both MMD^2 estimators are always written; ``estimator`` picks the one the
    ``mmd`` column, heatmap, summary and permutation tests use."""

    features: Optional[Path] = option(None, "features directory to read (default: this run's featurize stage)")
    sources: Optional[list[str]] = option(None, "datasets (sources) to compare (null: every source in the features)")
    subsample: int = option(2000, "points per dataset for MMD, seeded (all of a smaller dataset)")
    sigma: Optional[float] = option(None, "fixed RBF bandwidth (null: median heuristic over the pooled subsample)")
    bandwidth_factors: list[float] = option(
        factory=lambda: [1.0], help="the kernel is the sum of RBF kernels of bandwidth sigma * f over these factors"
    )
    median_sample_size: int = option(2000, "pooled points the median heuristic uses")
    estimator: Literal["unbiased", "biased"] = option("unbiased", "MMD^2 estimator of the mmd column, heatmap, summary and tests")
    permutations: int = option(200, "permutations per pair for the p-values (0: no test)")
    alpha: float = option(0.05, "significance level of the pair tests in the summary and heatmap")
    method: Literal["exact", "rff"] = option("exact", "exact kernel sums, or rff: random Fourier features (linear time, approximate)")
    rff_features: int = option(2048, "random Fourier features per bandwidth (method: rff)")
    block_budget_mb: float = option(512.0, "memory bound of each kernel buffer, MiB", throughput=True)
    device: Device = option("auto", "where the kernel tiles are computed: auto (a GPU if visible), cpu, cuda, cuda:N", throughput=True)
    tsne: bool = option(True, "draw the t-SNE map of the datasets")
    tsne_max_points: int = option(20000, "points of the map (a subsample stratified by source)")
    pca_dim: int = option(50, "PCA dimension before t-SNE")
    perplexity: float = option(30.0, "t-SNE perplexity")
    tsne_iterations: int = option(500, "t-SNE iterations (openTSNE n_iter)")
    n_jobs: int = option(0, "t-SNE threads (0: all cores)", throughput=True)

    def validate(self) -> None:
        if self.subsample < 2:
            raise ConfigError(f"subsample: MMD needs at least 2 points per dataset, got {self.subsample}")
        if self.sigma is not None and not self.sigma > 0:
            raise ConfigError(f"sigma: must be > 0 (or null for the median heuristic), got {self.sigma}")
        if not self.bandwidth_factors or any(not f > 0 for f in self.bandwidth_factors):
            raise ConfigError(
                f"bandwidth_factors: expected a non-empty list of positive numbers, got {self.bandwidth_factors}"
            )
        if self.median_sample_size < 2:
            raise ConfigError(f"median_sample_size: must be >= 2, got {self.median_sample_size}")
        if self.permutations < 0:
            raise ConfigError(f"permutations: must be >= 0, got {self.permutations}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha: must be in (0, 1), got {self.alpha}")
        if self.rff_features < 1:
            raise ConfigError(f"rff_features: must be >= 1, got {self.rff_features}")
        if not self.block_budget_mb > 0:
            raise ConfigError(f"block_budget_mb: must be > 0, got {self.block_budget_mb}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device: expected auto, cpu or cuda[:N], got {self.device!r}")
        if self.tsne_max_points < 2 or self.pca_dim < 2 or not self.perplexity > 0 or self.tsne_iterations < 1:
            raise ConfigError(
                f"tsne_max_points / pca_dim / perplexity / tsne_iterations: expected >= 2, >= 2, > 0, >= 1, got "
                f"{self.tsne_max_points}, {self.pca_dim}, {self.perplexity}, {self.tsne_iterations}"
            )
