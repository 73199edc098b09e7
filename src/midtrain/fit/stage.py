"""``midtrain fit``: train the proximity estimator (VLA = positive, VLM pool = negative).

Reads the feature run (``featurize`` stage, or ``features:``), loads the VLA rows and a
seeded subsample of the pool rows (``max_negatives``; the pool can be far larger than
memory), trains ``estimator.train_estimator`` and writes::

    fit/estimator/model.safetensors   weights + standardiser (feature_mean, feature_std)
    fit/estimator/config.json         architecture, feature-run fingerprint, metrics
    fit/manifest.json                 + val_auc, val_accuracy, val_loss, curve, counts
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.features import POOL_KIND, VLA_KIND, FeatureSet, load_finite_rows, resolve_features, select_rows
from ..runs import RunDir, SampleError, StageError, StageRun, stage_run
from .config import FitConfig
from .estimator import save_estimator, train_estimator

ESTIMATOR_DIR = "estimator"


def _subsample(rows: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(rows) <= cap:
        return rows
    return np.sort(rng.choice(rows, size=cap, replace=False))


def load_finite_features(st: StageRun, fs: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """Gather ``rows`` as float32; a row with NaN/inf is a SampleError (raised or recorded as a skip)."""

    def record(bad: np.ndarray) -> None:
        for row, sample_id in zip(bad, fs.ids_of(bad)):
            st.handle(SampleError("non-finite feature values", fs.where(int(row)),
                                  "NaN or inf in the feature vector; re-run featurize for this sample", sample_id))  # fmt: skip

    return load_finite_rows(fs, rows, record)[0]


def fit_estimator(config: FitConfig, run_dir: RunDir, force: bool = False) -> Path:
    fr = resolve_features(config.features, run_dir)
    with stage_run(run_dir, "fit", config, inputs=[fr.input_path], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        fs = fr.features
        rng = np.random.default_rng(config.seed)
        pos_rows = _subsample(select_rows(fs, VLA_KIND, config.vla_sources), config.max_positives, rng)
        neg_rows = _subsample(select_rows(fs, POOL_KIND, config.pool_sources), config.max_negatives, rng)
        with st.timed("load"):
            positives = load_finite_features(st, fs, pos_rows)
            negatives = load_finite_features(st, fs, neg_rows)
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
