"""2-D maps of the feature space: PCA to 50 dimensions, then openTSNE.

The map is drawn from a stratified subsample so small sources are visible next to
large ones: every source gets an equal share of the point budget, and shares a small
source cannot fill go to the others.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def stratified_quota(sizes: Sequence[int], max_points: int) -> list[int]:
    """Points to draw per source: ``min(size, fair share of what is left)``, smallest first.

    The total is at most ``max_points`` (exactly ``min(sum(sizes), max_points)`` up to
    integer rounding), and no source gets more than it has.
    """
    quota = [0] * len(sizes)
    remaining = max_points
    order = np.argsort(np.asarray(sizes), kind="stable")
    for k, i in enumerate(order):
        quota[i] = int(min(sizes[i], remaining // (len(sizes) - k)))
        remaining -= quota[i]
    return quota


def pca_reduce(features: np.ndarray, dim: int = 50, seed: int = 0) -> np.ndarray:
    """Project ``[n, d]`` features on their first ``dim`` principal components (fewer if ``n`` or ``d`` is)."""
    from sklearn.decomposition import PCA

    components = min(dim, features.shape[0], features.shape[1])
    if components >= features.shape[1]:
        return features - features.mean(0, keepdims=True)
    return PCA(n_components=components, random_state=seed).fit_transform(features)


def tsne_map(
    features: np.ndarray, perplexity: float = 30.0, seed: int = 0, n_jobs: int = 0, iterations: int = 500
) -> tuple[np.ndarray, float]:
    """openTSNE embedding ``[n, 2]`` of ``features`` (already PCA-reduced) and the perplexity used.

    The perplexity is capped at ``(n - 1) / 3``, the largest that ``n`` points support.
    ``iterations`` is openTSNE's ``n_iter`` after the early-exaggeration phase (which runs
    ``min(250, iterations / 2)`` iterations).
    """
    from openTSNE import TSNE

    used = float(min(perplexity, (features.shape[0] - 1) / 3.0))
    embedding = TSNE(
        n_components=2,
        perplexity=used,
        random_state=seed,
        n_jobs=n_jobs or os.cpu_count() or 1,
        verbose=False,
        n_iter=iterations,
        early_exaggeration_iter=min(250, iterations // 2),
    ).fit(np.ascontiguousarray(features, dtype=np.float64))
    return np.asarray(embedding, dtype=np.float32), used
