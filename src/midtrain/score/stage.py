"""``midtrain score``: score every VLM pool sample; higher = closer to the VLA data.

Feature scorers (``proximity`` - the trained estimator, ``random``, ``mean_distance``)
stream the feature run shard by shard in fixed-size chunks, so memory is bounded by
the shard and chunk size, not the pool. Catalog scorers (``vla_perplexity``,
``delta_perplexity``) stream the catalog through VLMs in batches.

Outputs::

    score/shards/<shard>.parquet       per input shard (resume at shard granularity)
    score/proximity_scores.parquet     id, source, score (+ logit for ``proximity``,
                                       + nll columns for the perplexity scorers)
    score/manifest.json                + scorer, order_column, feature_fingerprint
                                       (or catalog_fingerprint), pool_rows

``order_column`` is what ``select`` ranks by and uses as a log-weight; the feature (or
catalog) fingerprint lets ``select`` and ``export`` reject scores from another run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.features import (
    POOL_KIND, VLA_KIND, FeatureRun, check_sources, empty_set_error, load_finite_rows, npy_layout, resolve_features,
    rows_mask, select_rows, stream_feature_chunks,
)  # fmt: skip
from ..devices import torch_threads
from ..fit.estimator import load_estimator, read_estimator_config
from ..runs import RunDir, SampleError, StageError, StageRun, atomic_path, stage_run, write_parquet_atomic
from .config import CATALOG_SCORERS, FEATURE_SCORERS, ScoreConfig
from .scorers import FeatureScorer, MeanDistanceScorer, ProximityScorer, RandomScorer, choose_kernel

SCORES_FILE = "proximity_scores.parquet"


# --------------------------------------------------------------------------- feature scorers


def build_feature_scorer(config: ScoreConfig, run_dir: RunDir, fr: FeatureRun, st_log) -> tuple[FeatureScorer, dict]:
    """The configured feature scorer and its provenance for the manifest."""
    if config.scorer == "random":
        return RandomScorer(config.seed), {}
    if config.scorer == "mean_distance":
        rows = select_rows(fr.features, VLA_KIND, config.vla_sources)
        if len(rows) > config.max_reference:
            rows = np.sort(np.random.default_rng(config.seed).choice(rows, config.max_reference, replace=False))
        fs = fr.features

        def refuse(bad: np.ndarray) -> None:
            raise StageError(f"{fs.where(int(bad[0]))}: VLA reference feature has NaN/inf values (id {fs.id_of(int(bad[0]))}); re-run featurize")

        ref, _ = load_finite_rows(fs, rows, refuse)
        return MeanDistanceScorer(ref, config.knn), {"reference_rows": int(len(rows))}
    est_dir = Path(config.estimator) if config.estimator is not None else run_dir.require("fit") / "estimator"
    try:
        est_cfg = read_estimator_config(est_dir)
        model = load_estimator(est_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise StageError(f"{exc}; run `midtrain fit` or set `estimator:`") from None
    if est_cfg["dim"] != fr.features.dim:
        raise StageError(
            f"{est_dir}: the estimator expects {est_cfg['dim']}-dim features but the feature run {fr.root} has "
            f"dim {fr.features.dim}; fit the estimator on features from the same VLM and pooling"
        )
    trained_on = est_cfg.get("feature_fingerprint")
    if trained_on != fr.fingerprint:
        msg = (f"{est_dir}: the estimator was fitted on feature run {trained_on} ({est_cfg.get('feature_dir')}) but the "
               f"pool features are from {fr.fingerprint} ({fr.root})")  # fmt: skip
        if not config.allow_foreign_estimator:
            raise StageError(msg + "; re-fit, or set allow_foreign_estimator: true if both come from the same VLM and pooling")
        st_log.warning("%s (allowed by allow_foreign_estimator)", msg)
    layouts = [npy_layout(fr.features.shards_dir / f"{n}.npy") for n in fr.features.names]
    pool_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype, _ in layouts)  # every row is read
    kernel, why = choose_kernel(config.kernel, model.kind, pool_bytes)
    scorer = ProximityScorer(model, kernel, kernel_reason=why, log=st_log)
    return scorer, {"estimator": str(est_dir), "estimator_feature_fingerprint": trained_on}


def score_feature_shard(scorer: FeatureScorer, npy_path: Path, ids: list[str], chunk_rows: int | None = None) -> dict[str, np.ndarray]:
    """Score every row of one shard, streaming it in ``chunk_rows`` chunks (unset: the scorer's default)."""
    n = len(ids)
    (rows, dim), _, _ = npy_layout(npy_path)
    if rows != n:
        raise StageError(f"{npy_path}: has {rows} rows but its ids file lists {n}; the shard is corrupt, re-run featurize")
    expected = getattr(scorer, "dim", None)
    if expected is not None and dim != expected:
        raise StageError(f"{npy_path}: features have dimension {dim} but the {scorer.name} scorer expects {expected}")
    cols = {c: np.empty(n, dtype=np.float32 if c == "logit" else np.float64) for c in scorer.columns}
    for start, chunk in stream_feature_chunks(npy_path, chunk_rows or scorer.default_chunk_rows):
        end = start + len(chunk)
        scorer.score_chunk(chunk, ids[start:end], {c: v[start:end] for c, v in cols.items()})
    return scorer.finalize(cols)


def _score_features(st: StageRun, config: ScoreConfig, run_dir: RunDir, fr: FeatureRun) -> None:
    fs = fr.features
    check_sources(fs, POOL_KIND, config.pool_sources)
    scorer, provenance = build_feature_scorer(config, run_dir, fr, st.log)
    st.extra.update({**scorer.describe(), **provenance, "feature_fingerprint": fr.fingerprint,
                     "feature_dir": str(fr.root), "dim": fs.dim})  # fmt: skip
    with torch_threads(config.num_threads or 1):
        for name in st.progress(fs.names, desc="score", unit="shard"):
            if st.shard_done(name):
                continue
            st.current_shard = name
            ids_table = fs.ids(name)
            local = np.flatnonzero(rows_mask(ids_table, POOL_KIND, config.pool_sources))
            if len(local):
                ids = ids_table.column("id").to_pylist()
                with st.timed("score"):
                    cols = score_feature_shard(scorer, fs.shards_dir / f"{name}.npy", ids, config.chunk_rows)
                cols = {c: v[local] for c, v in cols.items()}
                finite = np.isfinite(cols[scorer.order_column]) & np.isfinite(cols["score"])
                for j in np.flatnonzero(~finite):
                    row = int(local[j])
                    st.handle(SampleError("non-finite feature values", f"{fs.shards_dir / (name + '.npy')} row {row}",
                                          "NaN or inf in the feature vector; re-run featurize for this sample", ids[row]))  # fmt: skip
                keep = local[finite]
                table = pa.table({"id": ids_table.column("id").take(keep), "source": ids_table.column("source").take(keep),
                                  **{c: v[finite] for c, v in cols.items()}})  # fmt: skip
            else:
                table = None
            _write_part(st, name, table, read=len(local))
    st.current_shard = None
    st.extra.update(scorer.describe())  # again: the kernel that ran (a compiled kernel may have fallen back)
    if not any(st.shard_info(n)["read"] for n in fs.names):
        raise empty_set_error(fs, POOL_KIND, config.pool_sources)


# --------------------------------------------------------------------------- catalog scorers


def _score_catalog(st: StageRun, config: ScoreConfig, catalog_dir: Path) -> None:
    from .perplexity import score_catalog_with_perplexity

    score_catalog_with_perplexity(st, config, catalog_dir, _write_part)


# --------------------------------------------------------------------------- output


def _write_part(st: StageRun, name: str, table: pa.Table | None, read: int) -> None:
    """Write one shard's scores (or an empty marker) and mark the shard done."""
    rows = 0
    if table is not None and table.num_rows:
        write_parquet_atomic(st.dir / "shards" / f"{name}.parquet", table)
        rows = table.num_rows
    st.mark_shard_done(name, {"read": int(read), "written": int(rows)})


def _merge_parts(st: StageRun) -> int:
    """Concatenate the per-shard parts (in shard order) into ``proximity_scores.parquet``, streaming."""
    parts = [p for p in sorted((st.dir / "shards").glob("*.parquet")) if st.shard_done(p.stem)]  # no stray file
    total = 0
    with atomic_path(st.dir / SCORES_FILE) as tmp:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                total += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise StageError(f"{st.dir}: no pool sample could be scored (see {st.dir / 'errors.jsonl'})")
    return total


def score_pool(config: ScoreConfig, run_dir: RunDir, force: bool = False) -> Path:
    if config.scorer in FEATURE_SCORERS:
        fr = resolve_features(config.features, run_dir)
        inputs = [fr.input_path]
        if config.scorer == "proximity":
            est_dir = Path(config.estimator) if config.estimator is not None else run_dir.require("fit") / "estimator"
            inputs.append(est_dir)
    else:
        catalog_dir = run_dir.require("catalog")
        models = [config.vla_model] + ([config.base_model] if config.scorer == "delta_perplexity" else [])
        # local model directories are hashed (weights included, cached by size and mtime);
        # a hub id is identified by its name in the config
        inputs = [catalog_dir / "manifest.json"] + [Path(m) for m in models if Path(m).exists()]
    with stage_run(run_dir, "score", config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        if config.scorer in FEATURE_SCORERS:
            _score_features(st, config, run_dir, fr)
        else:
            _score_catalog(st, config, catalog_dir)
        done = [st.shard_info(p.name[: -len(".done")]) for p in sorted((st.dir / "shards").glob("*.done"))]
        st.counts["read"] = sum(d.get("read", 0) for d in done)
        with st.timed("merge"):
            st.counts["written"] = _merge_parts(st)
        st.extra.update({"scores_file": str(st.final_dir / SCORES_FILE), "pool_rows": st.counts["written"]})
        st.log.info("scored %d pool samples with %s", st.counts["written"], config.scorer)
    return st.dir
