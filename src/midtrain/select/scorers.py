"""Proximity scorers behind one interface: higher score = closer to the VLA data.

Two families:

- ``FeatureScorer`` (``proximity``, ``random``, ``mean_distance``) scores chunks of raw
  float16 feature rows;
- ``CatalogScorer`` (``vla_perplexity``, ``delta_perplexity``) scores catalog rows
  (text + images) with VLMs; see ``midtrain.select.perplexity``.

Every scorer returns a dict of float columns with at least ``score``; ``order_column``
names the column selection ranks by and uses as a log-weight for Gumbel-top-K
sampling (the estimator's ``logit`` = log density ratio, which unlike the sigmoid
score never saturates to exact ties near 1).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from scipy.special import expit

from .estimator import ProximityEstimator


class FeatureScorer:
    """Scores ``[n, d]`` float16 feature chunks.

    ``score_chunk`` fills the arrays of ``out`` (one per name in ``columns``, length n) in
    place; ``finalize`` derives further columns once per shard (keeps per-chunk work minimal).
    """

    name = "feature"
    order_column = "score"
    columns: tuple[str, ...] = ("score",)

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def finalize(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cols

    def describe(self) -> dict:
        return {"scorer": self.name, "order_column": self.order_column}


class ProximityScorer(FeatureScorer):
    """``s(x) = sigmoid(f(x))`` of a trained estimator, with the standardiser folded into
    the first layer so a chunk costs one float16->float32 copy into a reused buffer plus
    one matmul per layer, written straight into the output (bandwidth-bound for the
    linear estimator).

    Columns: ``logit`` (float32, the log density-ratio estimate) and, per shard,
    ``score`` = sigmoid(logit) in float64.
    """

    name = "proximity"
    order_column = "logit"
    columns = ("logit",)

    def __init__(self, model: ProximityEstimator, chunk_rows: int = 1024):
        self.dim = model.dim
        self.kind = model.kind
        self.layers = model.folded_layers()
        self.buffer = torch.empty(chunk_rows, self.dim, dtype=torch.float32)

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        n = len(x16)
        if n > len(self.buffer):
            self.buffer = torch.empty(n, self.dim, dtype=torch.float32)
        x = self.buffer[:n]
        x.copy_(torch.from_numpy(x16))
        logit = torch.from_numpy(out["logit"][:n])
        with torch.no_grad():
            if len(self.layers) == 1:
                w, b = self.layers[0]
                torch.mv(x, w[0], out=logit)
                logit.add_(b[0])
            else:
                h = x
                for i, (w, b) in enumerate(self.layers):
                    h = torch.addmm(b, h, w.T)
                    if i < len(self.layers) - 1:
                        h = h.relu_()
                logit.copy_(h[:, 0])

    def finalize(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"score": expit(cols["logit"].astype(np.float64)), "logit": cols["logit"]}

    def logits(self, x16: np.ndarray) -> np.ndarray:
        out = {"logit": np.empty(len(x16), np.float32)}
        self.score_chunk(np.ascontiguousarray(x16, dtype=np.float16), [], out)
        return out["logit"]


class RandomScorer(FeatureScorer):
    """Uniform [0, 1) scores from a hash of ``(seed, id)``: the same sample gets the same
    score whatever the shard layout, and a different seed gives an independent draw."""

    name = "random"

    def __init__(self, seed: int):
        self.salt = f"midtrain-random:{seed}:".encode()

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        words = np.fromiter(
            (int.from_bytes(hashlib.blake2b(self.salt + i.encode(), digest_size=8).digest(), "little") for i in ids),
            dtype=np.uint64,
            count=len(ids),
        )
        out["score"][: len(ids)] = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


class MeanDistanceScorer(FeatureScorer):
    """``score = -mean_j ||x - y_j||_2`` over the VLA reference rows ``y`` (or over the
    ``knn`` nearest ones), computed blockwise with ``torch.cdist``; closer = higher."""

    name = "mean_distance"

    def __init__(self, reference: np.ndarray, knn: int | None = None, block_rows: int = 1024):
        self.reference = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
        self.dim = self.reference.shape[1]
        self.knn = knn
        self.block_rows = block_rows

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        x = torch.from_numpy(np.asarray(x16, dtype=np.float32))
        for s in range(0, len(x), self.block_rows):
            d = torch.cdist(x[s : s + self.block_rows], self.reference)
            if self.knn is not None:
                d = torch.topk(d, min(self.knn, d.shape[1]), dim=1, largest=False).values
            out["score"][s : s + len(d)] = -d.double().mean(dim=1).numpy()

    def describe(self) -> dict:
        return {**super().describe(), "reference_rows": len(self.reference), "knn": self.knn}
