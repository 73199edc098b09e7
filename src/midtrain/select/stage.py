"""``midtrain select``: choose the mixture from the pool scores (no re-scoring), plus a report.

Ordering. Every pool row gets ``rank`` (1 = closest) by the score file's
``order_column`` (the estimator's logit, else ``score``), descending, ties broken by
``id`` ascending - so equal scores are resolved the same way on every run.

Methods.

- ``top_k``: the K best rows (exact).
- ``gumbel``: Gumbel-top-K sampling without replacement with probabilities proportional
  to ``exp(w / T)``, where the log-weight ``w`` is the order column (for the estimator
  the logit = log density ratio ``log r``, ``r = s / (1 - s)``, so at ``T = 1`` samples
  are drawn in proportion to the density ratio, as DSIR does). Keys are
  ``w / T + G`` with ``G ~ Gumbel(0, 1)`` drawn from ``seed`` in id order; the K
  largest keys are taken. Small ``T`` -> top-K; large ``T`` -> uniform.

Per-source floors and caps (``source_floors`` / ``source_caps``; an int is a count, a
float a fraction of K - floors round up, caps round down). Algorithm, on the method's
key order: (1) each source with a floor takes its ``floor`` best rows; (2) the rest of K
is filled in key order, skipping rows of sources that reached their cap. Infeasible
settings (floors summing above K, a floor above its cap or above the source's size,
caps that cannot fill K) are errors naming the sources.

De-duplication (``dedup: true``): rows whose catalog content (messages, instruction,
image bytes - image files are read) hashes equal are duplicates; the best-ranked copy
is kept, the others are not eligible and are listed in ``duplicates.parquet``.

Outputs: ``selection.parquet`` (``id, source, score, rank, selected``, sorted by rank),
``selection_metrics.json`` (with the selection's ``source_diversity``, see
:mod:`midtrain.select.diversity`) and ``report/`` (see :mod:`midtrain.select.report`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.catalog import iter_catalog_with_ids
from ..data.features import FeatureRun, resolve_features
from ..runs import RunDir, SampleError, StageError, StageRun, stage_run, write_json_atomic, write_parquet_atomic
from ..score.stage import SCORES_FILE
from .config import SelectConfig
from .diversity import source_diversity

SELECTION_FILE = "selection.parquet"
METRICS_FILE = "selection_metrics.json"


# --------------------------------------------------------------------------- inputs


def read_score_manifest(scores_path: Path) -> dict:
    """The manifest of the stage that wrote ``scores_path`` (scorer, order column, fingerprints)."""
    if not scores_path.exists():
        raise StageError(f"{scores_path}: score file not found; run `midtrain score` first")
    manifest_path = scores_path.parent / "manifest.json"
    return json.loads(manifest_path.read_text()) if manifest_path.exists() else {}


def read_scores(scores_path: Path, manifest: dict) -> pa.Table:
    """The score table, checked for the columns selection needs; sets ``manifest["order_column"]``."""
    table = pq.read_table(scores_path)
    order_col = manifest.get("order_column", "logit" if "logit" in table.column_names else "score")
    for col in ("id", "source", "score", order_col):
        if col not in table.column_names:
            raise StageError(f"{scores_path}: missing column {col!r} (has {table.column_names}); not a midtrain score file")
    manifest["order_column"] = order_col
    return table


def check_same_feature_run(score_manifest: dict, scores_path: Path, fr: FeatureRun) -> None:
    """A score file must come from the feature run we compare it with (ids and rows line up)."""
    scored_on = score_manifest.get("feature_fingerprint")
    if scored_on is not None and scored_on != fr.fingerprint:
        raise StageError(
            f"{scores_path}: scores were computed on feature run {scored_on} ({score_manifest.get('feature_dir')}) "
            f"but the features here are from {fr.fingerprint} ({fr.root}); re-run `midtrain score` on this feature run"
        )


def check_same_catalog(score_manifest: dict, scores_path: Path, run_dir: RunDir) -> None:
    scored_on = score_manifest.get("catalog_fingerprint")
    current = (run_dir.manifest("catalog") or {}).get("fingerprint")
    if scored_on is not None and current is not None and scored_on != current:
        raise StageError(
            f"{scores_path}: scores were computed on catalog {scored_on} but this run's catalog is {current}; "
            "re-run `midtrain score`"
        )


# --------------------------------------------------------------------------- ordering


def order_indices(keys: np.ndarray, ids: pa.Array) -> np.ndarray:
    """Row indices sorted by ``keys`` descending, ties by ``id`` ascending (deterministic)."""
    t = pa.table({"k": pa.array(keys, type=pa.float64()), "id": ids})
    return pc.sort_indices(t, sort_keys=[("k", "descending"), ("id", "ascending")]).to_numpy()


def gumbel_keys(log_weights: np.ndarray, ids: pa.Array, temperature: float, seed: int) -> np.ndarray:
    """``w / T + G``, with the Gumbel noise ``G`` drawn in id order so the sample depends on
    the seed and the ids only, not on the row order of the score file."""
    by_id = pc.sort_indices(pa.table({"id": ids}), sort_keys=[("id", "ascending")]).to_numpy()
    noise = np.empty(len(log_weights))
    noise[by_id] = np.random.default_rng(seed).gumbel(size=len(log_weights))
    return log_weights / temperature + noise


def _resolve_limit(value: int | float, k: int, round_up: bool) -> int:
    if isinstance(value, float):
        return int(math.ceil(value * k - 1e-9)) if round_up else int(math.floor(value * k + 1e-9))
    return int(value)


def choose_with_source_limits(
    candidates: np.ndarray, source_codes: np.ndarray, k: int, floors: np.ndarray, caps: np.ndarray, names: list[str]
) -> np.ndarray:
    """Pick ``k`` of ``candidates`` (row indices in preference order): floors first, then fill by
    preference order respecting caps. ``floors`` / ``caps`` are per source code (caps may be inf)."""
    src = source_codes[candidates]
    m = len(candidates)
    perm = np.argsort(src, kind="stable")
    per_source = np.bincount(src, minlength=len(names))
    starts = np.concatenate([[0], np.cumsum(per_source)[:-1]])
    within = np.empty(m, dtype=np.int64)
    within[perm] = np.arange(m) - starts[src[perm]]
    for code, name in enumerate(names):
        if floors[code] > caps[code]:
            raise StageError(f"source_floors.{name} ({int(floors[code])}) is above source_caps.{name} ({caps[code]:.0f})")
        if floors[code] > per_source[code]:
            raise StageError(
                f"source_floors.{name}: asks for {int(floors[code])} rows but only {per_source[code]} eligible rows of "
                f"{name} are in the pool"
            )
    if floors.sum() > k:
        raise StageError(f"source_floors add up to {int(floors.sum())}, more than K = {k}")
    take_floor = within < floors[src]
    fill = np.flatnonzero(~take_floor & (within < caps[src]))
    need = k - int(take_floor.sum())
    if len(fill) < need:
        raise StageError(
            f"source_caps are too tight: only {int(take_floor.sum()) + len(fill)} rows can be selected under the caps "
            f"{ {n: c for n, c in zip(names, caps.tolist()) if np.isfinite(c)} }, but K = {k}"
        )
    return np.sort(np.concatenate([candidates[take_floor], candidates[fill[:need]]]))


# --------------------------------------------------------------------------- de-duplication


def content_digest(row: dict, where: str) -> bytes:
    """16-byte hash of a catalog row's content: messages, instruction and image bytes.

    Image files are read so identical images at different paths hash equal.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([[m["role"], m["content"]] for m in row.get("messages") or []], ensure_ascii=False).encode())
    h.update(b"\x00" + (row.get("instruction") or "").encode())
    for ref in row.get("image_refs") or []:
        if ref.get("bytes") is not None:
            data = ref["bytes"]
        elif ref.get("path"):
            try:
                data = Path(ref["path"]).read_bytes()
            except OSError as exc:
                raise SampleError("missing image file", where, f"{ref['path']}: {exc.strerror}", row.get("id")) from None
        else:
            data = b""
        h.update(b"\x01" + hashlib.blake2b(data, digest_size=16).digest())
    return h.digest()


def catalog_digests(st: StageRun, catalog_dir: Path, ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Content digests (as ``[n, 2]`` uint64) of the catalog rows with these ids, aligned to
    ``ids``; and a mask of rows whose content could not be read (recorded skips)."""
    wanted = pa.array(ids) if not isinstance(ids, pa.Array) else ids
    found_ids, found_digests, unreadable = [], [], []
    for batch in iter_catalog_with_ids(catalog_dir, wanted, ["id", "messages", "instruction", "image_refs", "origin"]):
        for row in batch.to_pylist():
            where = row.get("origin") or f"catalog id {row['id']}"
            try:
                digest = content_digest(row, where)
            except SampleError as err:
                st.handle(err)
                unreadable.append(row["id"])
                continue
            found_ids.append(row["id"])
            found_digests.append(digest)
    index = pc.index_in(wanted, value_set=pa.array(found_ids + unreadable, type=pa.string()))
    missing = np.flatnonzero(pc.is_null(index).to_numpy(zero_copy_only=False))
    if len(missing):
        raise StageError(
            f"{catalog_dir}: {len(missing)} scored sample(s) are not in the catalog (first: {wanted[int(missing[0])]}); "
            "the score file comes from another catalog - re-run `midtrain score`"
        )
    index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    digests = np.frombuffer(b"".join(found_digests) + b"\x00" * 16 * len(unreadable), dtype="<u8").reshape(-1, 2)
    return digests[index], index >= len(found_ids)


def duplicate_mask(digests_in_order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For digests listed best-first: which positions repeat an earlier digest, and the
    position of the first (kept) copy for every position."""
    _, first, inverse = np.unique(digests_in_order, axis=0, return_index=True, return_inverse=True)
    kept_pos = first[inverse.reshape(-1)]
    return kept_pos != np.arange(len(digests_in_order)), kept_pos


# --------------------------------------------------------------------------- the stage


def select_mixture(config: SelectConfig, run_dir: RunDir, force: bool = False) -> Path:
    scores_path = Path(config.scores) if config.scores is not None else run_dir.require("score") / SCORES_FILE
    score_manifest = read_score_manifest(scores_path)
    fr = None
    if config.features is not None or run_dir.manifest("featurize") is not None:
        fr = resolve_features(config.features, run_dir)
        check_same_feature_run(score_manifest, scores_path, fr)
    check_same_catalog(score_manifest, scores_path, run_dir)
    catalog_dir = run_dir.stage_dir("catalog") if (run_dir.manifest("catalog") or {}).get("status") == "complete" else None
    if config.dedup and catalog_dir is None:
        raise StageError(f"dedup: needs the catalog to hash sample contents, but {run_dir.stage_dir('catalog')} is not complete")
    inputs = [scores_path] + ([fr.input_path] if fr is not None else [])
    if catalog_dir is not None and (config.dedup or config.report):
        inputs.append(catalog_dir / "manifest.json")
    with stage_run(run_dir, "select", config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        table = read_scores(scores_path, score_manifest)
        result = _select(st, config, table, score_manifest, scores_path, catalog_dir)
        if config.report:
            from .report import write_selection_report

            with st.timed("report"):
                metrics = write_selection_report(st, config, result, fr, catalog_dir)
        else:
            metrics = result.summary()
        sources = result.table.column("source").to_numpy(zero_copy_only=False)
        metrics["source_diversity"] = source_diversity(sources[result.selected], sources[result.eligible])
        write_json_atomic(st.dir / METRICS_FILE, metrics)
        st.extra.update({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})
    return st.dir


@dataclass
class SelectionResult:
    """The selection in memory: the score table in rank order plus masks (for the report)."""

    table: pa.Table  # id, source, score, [logit], rank, selected - sorted by rank
    eligible: np.ndarray  # bool, aligned with table
    k: int
    method: str
    scorer: str
    n_duplicates: int

    @property
    def selected(self) -> np.ndarray:
        return self.table.column("selected").to_numpy(zero_copy_only=False)

    def summary(self) -> dict:
        return {"k": self.k, "method": self.method, "scorer": self.scorer, "pool_rows": int(self.table.num_rows),
                "eligible_rows": int(self.eligible.sum()), "duplicates_removed": self.n_duplicates}  # fmt: skip


def _select(st: StageRun, config: SelectConfig, table: pa.Table, man: dict, scores_path: Path, catalog_dir) -> SelectionResult:
    n = table.num_rows
    st.counts["read"] = n
    order_col = man["order_column"]
    keys = table.column(order_col).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(keys))
    if len(bad):
        raise StageError(f"{scores_path}: {len(bad)} non-finite {order_col} value(s) (first: row {bad[0]}, id {table.column('id')[int(bad[0])]})")
    ids = table.column("id").combine_chunks()
    if pc.count_distinct(ids).as_py() != n:
        raise StageError(f"{scores_path}: ids are not unique; the score file is corrupt, re-run `midtrain score`")
    sources_enc = pc.dictionary_encode(table.column("source").combine_chunks())
    names = [str(s) for s in sources_enc.dictionary.to_pylist()]
    codes = sources_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)

    for key, wanted in (("pool_sources", config.pool_sources), ("source_floors", list(config.source_floors)),
                        ("source_caps", list(config.source_caps))):  # fmt: skip
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise StageError(f"{key}: source(s) {unknown} are not in {scores_path}; pool sources: {', '.join(names)}")
    eligible = np.isin(codes, [names.index(s) for s in config.pool_sources]) if config.pool_sources else np.ones(n, bool)

    with st.timed("order"):
        order = order_indices(keys, ids)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)

    n_dup = 0
    if config.dedup:
        with st.timed("dedup"):
            digests, unreadable = catalog_digests(st, catalog_dir, ids)
            eligible &= ~unreadable
            elig_order = order[eligible[order]]  # table rows, best first
            is_dup, kept_pos = duplicate_mask(digests[elig_order])
        dup_pos = np.flatnonzero(is_dup)
        dup_rows, kept_rows = elig_order[dup_pos], elig_order[kept_pos[dup_pos]]
        eligible[dup_rows] = False
        n_dup = len(dup_rows)
        write_parquet_atomic(st.dir / "duplicates.parquet",
                             pa.table({"id": ids.take(pa.array(dup_rows)), "kept_id": ids.take(pa.array(kept_rows))}))  # fmt: skip
        st.counts["duplicates"] = n_dup
        st.log.info("de-duplication: %d duplicate(s) of better-ranked samples removed", n_dup)

    n_elig = int(eligible.sum())
    k = config.k if config.k is not None else max(1, int(round(config.fraction * n_elig)))
    if k > n_elig:
        raise StageError(
            f"k = {k} is larger than the eligible pool ({n_elig} rows of {n} in {scores_path}"
            + (f", after removing {n_dup} duplicates" if n_dup else "") + "); lower k or use fraction"
        )  # fmt: skip

    if config.method == "gumbel":
        sel_order = order_indices(gumbel_keys(keys, ids, config.temperature, config.seed), ids)
    else:
        sel_order = order
    candidates = sel_order[eligible[sel_order]]
    floors = np.zeros(len(names))
    caps = np.full(len(names), np.inf)
    for src, v in config.source_floors.items():
        floors[names.index(src)] = _resolve_limit(v, k, round_up=True)
    for src, v in config.source_caps.items():
        caps[names.index(src)] = _resolve_limit(v, k, round_up=False)
    chosen = choose_with_source_limits(candidates, codes, k, floors, caps, names)
    selected = np.zeros(n, dtype=bool)
    selected[chosen] = True

    cols = {"id": ids, "source": table.column("source"), "score": table.column("score")}
    if "logit" in table.column_names:
        cols["logit"] = table.column("logit")
    out = pa.table({**cols, "rank": pa.array(rank), "selected": pa.array(selected)}).take(pa.array(order))
    write_parquet_atomic(st.dir / SELECTION_FILE, out)
    st.counts["selected"] = k
    st.counts["written"] = n
    st.log.info("selected %d of %d eligible pool samples (%s, scorer %s)", k, n_elig, config.method, man.get("scorer"))
    return SelectionResult(out, eligible[order], k, config.method, str(man.get("scorer")), n_dup)
