"""``midtrain fit``: train the proximity estimator (VLA = positive, VLM pool = negative).

Reads the feature run (``featurize`` stage, or ``features:``), loads the VLA rows and a
seeded subsample of the pool rows (``max_negatives``; the pool can be far larger than
memory), trains ``estimator.train_estimator`` and writes::

    fit/estimator/model.safetensors   weights + standardiser (feature_mean, feature_std)
    fit/estimator/config.json         architecture, feature-run fingerprint, metrics
    fit/manifest.json                 + val_auc, val_accuracy, val_loss, curve, counts
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import ConfigError, StageConfig
from ..runs import RunDir, SampleError, StageError, StageRun, stage_run
from .estimator import TrainSettings, save_estimator, train_estimator
from .pool import POOL_KIND, VLA_KIND, FeatureRun, RowLocator, resolve_features, select_rows

ESTIMATOR_DIR = "estimator"


@dataclass
class FitConfig(StageConfig, TrainSettings):
    """Proximity-estimator training: the ``TrainSettings`` hyper-parameters (model, hidden,
    dropout, batch_size, lr, weight_decay, max_epochs, patience, min_delta,
    target_val_accuracy, monitor, val_fraction, num_threads) plus which rows to train on.

    ``max_positives`` / ``max_negatives``: seeded subsample caps (None = all rows;
    negatives are capped by default because the pool is usually much larger than memory).
    """

    features: Optional[Path] = None
    vla_sources: list[str] = field(default_factory=list)
    pool_sources: list[str] = field(default_factory=list)
    max_positives: Optional[int] = None
    max_negatives: Optional[int] = 200_000

    def validate(self) -> None:
        self.check()
        for key in ("max_positives", "max_negatives"):
            v = getattr(self, key)
            if v is not None and v < 2:
                raise ConfigError(f"{key}: must be >= 2 or null, got {v}")


def _subsample(rows: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(rows) <= cap:
        return rows
    return np.sort(rng.choice(rows, size=cap, replace=False))


def load_finite_features(st: StageRun, fr: FeatureRun, rows: np.ndarray, locator: RowLocator) -> np.ndarray:
    """Gather ``rows`` as float32; a row with NaN/inf is a SampleError (raised or recorded as a skip)."""
    x = fr.features.take(rows)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    for i in bad:
        st.handle(SampleError("non-finite feature values", locator.where(int(rows[i])),
                              "NaN or inf in the feature vector; re-run featurize for this sample",
                              locator.id_of(int(rows[i]))))  # fmt: skip
    return np.delete(x, bad, axis=0) if len(bad) else x


def fit_estimator(config: FitConfig, run_dir: RunDir, force: bool = False) -> Path:
    fr = resolve_features(config.features, run_dir)
    with stage_run(run_dir, "fit", config, inputs=[fr.input_path], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        fs = fr.features
        locator = RowLocator(fs)
        rng = np.random.default_rng(config.seed)
        pos_rows = _subsample(select_rows(fs, VLA_KIND, config.vla_sources), config.max_positives, rng)
        neg_rows = _subsample(select_rows(fs, POOL_KIND, config.pool_sources), config.max_negatives, rng)
        with st.timed("load"):
            positives = load_finite_features(st, fr, pos_rows, locator)
            negatives = load_finite_features(st, fr, neg_rows, locator)
        st.counts["read"] = len(pos_rows) + len(neg_rows)
        st.counts["positives"], st.counts["negatives"] = len(positives), len(negatives)
        if len(positives) < 2 or len(negatives) < 2:
            raise StageError(
                f"{fs.root}: need at least 2 usable VLA and 2 pool feature rows to fit, "
                f"got {len(positives)} and {len(negatives)}"
            )
        st.log.info("fitting %s estimator on %d VLA and %d pool rows (dim %d)", config.model, len(positives), len(negatives), fs.dim)
        with st.timed("train"):
            model, metrics = train_estimator(positives, negatives, config, log=st.log.info)
        provenance = {
            "feature_fingerprint": fr.fingerprint,
            "feature_dir": str(fr.root),
            "feature_model": fs.manifest.get("model"),
            "feature_pooling": fs.manifest.get("pooling"),
            "vla_sources": sorted({s for s, k in fs.sources().items() if k == VLA_KIND} & set(config.vla_sources or fs.sources())),
            "pool_sources": sorted({s for s, k in fs.sources().items() if k == POOL_KIND} & set(config.pool_sources or fs.sources())),
        }
        save_estimator(model, st.dir / ESTIMATOR_DIR, {**provenance, "metrics": metrics, "training": config.training_dict()})
        st.counts["written"] = 1
        st.extra.update({"model": config.model, "dim": fs.dim, **provenance,
                         "estimator": str(st.final_dir / ESTIMATOR_DIR), **metrics})  # fmt: skip
        st.log.info("val AUC %.4f, val accuracy %.4f after %d epochs (%s)", metrics["val_auc"],
                    metrics["val_accuracy"], metrics["epochs_run"], metrics["stopped_because"])  # fmt: skip
    return st.dir
