"""``midtrain gap``: how far each VLM source is from the robot data, in the frozen VLM's feature space.

Reads the feature shards of ``featurize`` (or ``features:``, another run's features
directory), subsamples every dataset (``source``) to ``subsample`` points with the run's
seed, and writes into ``<run>/gap/``:

- ``mmd.parquet``: one row per unordered pair of sources: ``source_a``, ``source_b``,
  ``kind_a``, ``kind_b``, ``mmd2_unbiased``, ``mmd2_biased``, ``mmd`` (``sqrt(max(MMD^2, 0))``
  of the configured ``estimator``), ``p_value`` (permutation test; null if
  ``permutations: 0``), ``n_a``, ``n_b``.
- ``mmd.json``: the same as ``[D, D]`` matrices (``mmd2_unbiased``, ``mmd2_biased``,
  ``mmd``, ``normalised_mmd``, ``p_values``) with ``sources``, ``kinds``, ``n``, ``sigma``,
  ``sigmas``, ``estimator``, ``method``, ``permutations`` and the ``normalisation`` used.
- ``summary.json``: mean MMD (and MMD^2) within the VLM group, within the VLA group and
  across groups, significant pairs, and ``vlm_ranking``: every VLM source with its mean
  MMD to the VLA sources, closest first.
- ``mmd_heatmap.png``: the normalised matrix (MMD / largest off-diagonal MMD), VLM sources
  first, group boundary marked.
- ``tsne.parquet`` (``id``, ``source``, ``kind``, ``x``, ``y``) and ``tsne.png``: openTSNE map
  of a stratified subsample after PCA.

The kernel is a Gaussian RBF with one global bandwidth for all pairs (the median
heuristic over the pooled subsample unless ``sigma`` is set), optionally summed over
``bandwidth_factors``; the sigma used is recorded in every output and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.features import FeatureSet, load_finite_rows, open_features
from ..runs import RunDir, SampleError, StageError, StageRun, stage_run, write_json_atomic, write_parquet_atomic
from ..seeding import keyed_rng
from .config import GapConfig
from .mmd import GapInputError, MMDMatrix, bandwidths, median_heuristic, mmd_matrix, mmd_matrix_rff
from .plots import plot_feature_map, plot_mmd_heatmap
from .tsne import pca_reduce, stratified_quota, tsne_map

KIND_ORDER = {"vlm": 0, "vla": 1}


# --------------------------------------------------------------------------- reading features


@dataclass
class _Pool:
    """The features directory, indexed by source: global rows per source, kinds."""

    fs: FeatureSet
    kinds: dict[str, str]  # source -> kind, in display order (VLM first, then VLA)
    rows: dict[str, np.ndarray]  # source -> sorted global row indices


def _open_pool(features_dir: Path, config: GapConfig) -> _Pool:
    try:
        fs = open_features(features_dir)
    except FileNotFoundError as exc:
        raise StageError(
            f"{exc}; run `midtrain featurize` first or point `features:` at a features directory"
        ) from None
    shapes = {name: fs.array(name).shape for name in fs.names}
    first = fs.names[0]
    codes, kinds_seen, sources_seen = [], {}, {}
    for name in fs.names:
        table = pq.read_table(fs.ids_file(name), columns=["source", "kind"])
        if shapes[name][1] != shapes[first][1]:
            bad = sorted(set(table.column("source").to_pylist()))
            raise StageError(
                f"{fs.shards_dir / name}.npy: feature dimension {shapes[name][1]} differs from "
                f"{shapes[first][1]} in {first}.npy (datasets in the mismatched shard: {', '.join(bad)}); "
                "all datasets must be featurized with the same model and pooling"
            )
        encoded = table.column("source").combine_chunks().dictionary_encode()
        local_names = encoded.dictionary.to_pylist()
        remap = np.array([sources_seen.setdefault(s, len(sources_seen)) for s in local_names], dtype=np.int64)
        codes.append(
            remap[encoded.indices.to_numpy(zero_copy_only=False)] if len(local_names) else np.zeros(0, np.int64)
        )
        pairs = table.group_by(["source", "kind"]).aggregate([])  # distinct (source, kind), not every row
        for s, k in zip(pairs.column("source").to_pylist(), pairs.column("kind").to_pylist()):
            kinds_seen.setdefault(s, k)
    all_codes = np.concatenate(codes)
    order = np.argsort(all_codes, kind="stable")
    counts = np.bincount(all_codes, minlength=len(sources_seen))
    rows = dict(zip(sources_seen, np.split(order, np.cumsum(counts)[:-1])))

    wanted = list(sources_seen)
    if config.sources is not None:
        unknown = [s for s in config.sources if s not in sources_seen]
        if unknown:
            raise StageError(
                f"sources: {', '.join(unknown)} not in {features_dir} (available: {', '.join(sorted(sources_seen))})"
            )
        wanted = list(dict.fromkeys(config.sources))
    wanted.sort(key=lambda s: (KIND_ORDER.get(kinds_seen[s], 2), s))
    return _Pool(
        fs,
        {s: kinds_seen[s] for s in wanted},
        {s: rows[s] for s in wanted},  # ascending: a stable argsort keeps row order within a source
    )


def _seeded_sample(rows: np.ndarray, k: int, seed: int, source: str, purpose: str) -> np.ndarray:
    """``k`` of ``rows`` without replacement, seeded by (run seed, source, purpose): a source's
    subsample does not change when other sources are added or removed."""
    if k >= len(rows):
        return rows
    rng = keyed_rng(seed, source, purpose)
    return np.sort(rng.choice(rows, size=k, replace=False))


def _load_finite(
    pool: _Pool, st: StageRun, source: str, rows: np.ndarray, reported: set[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``rows`` (float32) with non-finite rows handled per ``on_error``; returns (features, kept rows)."""
    fs = pool.fs

    def record(bad_rows: np.ndarray) -> None:
        for row, sample_id in zip(bad_rows, fs.ids_of(bad_rows)):
            if int(row) in reported:
                continue
            reported.add(int(row))
            st.current_shard = fs.locate(int(row))[0]
            st.handle(
                SampleError(
                    "non-finite features",
                    fs.where(int(row)),
                    f"dataset {source!r}, sample {sample_id!r}: NaN/inf in the feature vector; re-run featurize on it",
                    sample_id,
                )
            )
        st.current_shard = None

    return load_finite_rows(fs, rows, record)


def _load_subsamples(pool: _Pool, config: GapConfig, st: StageRun, reported: set[int]) -> dict[str, np.ndarray]:
    datasets = {}
    for source, rows in pool.rows.items():
        if len(rows) < 2:
            raise StageError(
                f"dataset {source!r} has {len(rows)} sample(s) in {pool.fs.root}; MMD needs at least 2 per dataset "
                "(featurize more of it, or leave it out with `sources: [...]`)"
            )
        picked = _seeded_sample(rows, config.subsample, config.seed, source, "mmd")
        feats, kept = _load_finite(pool, st, source, picked, reported)
        if len(kept) < 2:
            raise StageError(
                f"dataset {source!r}: fewer than 2 samples with finite features; see {st.dir}/errors.jsonl"
            )
        datasets[source] = feats
        st.counts["read"] += len(kept)
    return datasets


# --------------------------------------------------------------------------- outputs


def _normalise(mmd: np.ndarray) -> tuple[np.ndarray, str]:
    off = mmd[~np.eye(len(mmd), dtype=bool)]
    top = float(off.max()) if off.size else 0.0
    return (mmd / top if top > 0 else mmd.copy()), "normalised = MMD / max off-diagonal MMD (MMD = sqrt(max(MMD², 0)))"


def _pair_means(result: MMDMatrix, kinds: list[str], first: str, second: str) -> tuple[float | None, float | None, int]:
    """Mean MMD and MMD^2 over unordered pairs with one source of kind ``first`` and one of ``second``."""
    mmd, mmd2 = result.mmd, result.mmd2
    vals, vals2 = [], []
    for a in range(len(kinds)):
        for b in range(a + 1, len(kinds)):
            if {kinds[a], kinds[b]} == {first, second} and (first != second or kinds[a] == first):
                vals.append(mmd[a, b])
                vals2.append(mmd2[a, b])
    if not vals:
        return None, None, 0
    return float(np.mean(vals)), float(np.mean(vals2)), len(vals)


def _summary(result: MMDMatrix, kinds: list[str], config: GapConfig, sigma: float) -> dict:
    names = result.names
    out: dict = {}
    for label, (k1, k2) in {
        "within_vlm": ("vlm", "vlm"),
        "within_vla": ("vla", "vla"),
        "cross": ("vlm", "vla"),
    }.items():
        m, m2, count = _pair_means(result, kinds, k1, k2)
        out[f"mean_mmd_{label}"] = m
        out[f"mean_mmd2_{label}"] = m2
        out[f"pairs_{label}"] = count
    within = [v for v in (out["mean_mmd_within_vlm"], out["mean_mmd_within_vla"]) if v is not None]
    out["cross_over_within"] = (
        out["mean_mmd_cross"] / float(np.mean(within))
        if out["mean_mmd_cross"] is not None and within and np.mean(within) > 0
        else None
    )
    if result.p_values is not None:
        iu = np.triu_indices(len(names), 1)
        out["significant_pairs"] = (
            f"{int((result.p_values[iu] <= config.alpha).sum())} of {len(iu[0])} at alpha={config.alpha:g}"
        )
    out["sigma"] = sigma
    out["estimator"] = result.statistic
    vla = [i for i, k in enumerate(kinds) if k == "vla"]
    ranking = []
    for a, kind in enumerate(kinds):
        if kind != "vlm" or not vla:
            continue
        to_vla = result.mmd[a, vla]
        closest = vla[int(np.argmin(to_vla))]
        ranking.append(
            {
                "source": names[a],
                "mean_mmd_to_vla": float(to_vla.mean()),
                "mean_mmd2_to_vla": float(result.mmd2[a, vla].mean()),
                "closest_vla_source": names[closest],
                "mmd_to_closest_vla": float(result.mmd[a, closest]),
            }
        )
    ranking.sort(key=lambda r: r["mean_mmd_to_vla"])
    for rank, row in enumerate(ranking, 1):
        row["rank"] = rank
    out["vlm_ranking"] = ranking
    out["groups"] = {
        "vlm": [n for n, k in zip(names, kinds) if k == "vlm"],
        "vla": [n for n, k in zip(names, kinds) if k == "vla"],
    }
    return out


def _write_mmd(st: StageRun, result: MMDMatrix, kinds: list[str], config: GapConfig, sigma: float) -> None:
    names, n = result.names, result.sizes
    normalised, normalisation = _normalise(result.mmd)
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    p = result.p_values
    table = pa.table(
        {
            "source_a": [names[a] for a, _ in pairs],
            "source_b": [names[b] for _, b in pairs],
            "kind_a": [kinds[a] for a, _ in pairs],
            "kind_b": [kinds[b] for _, b in pairs],
            "mmd2_unbiased": pa.array([result.mmd2_unbiased[a, b] for a, b in pairs], pa.float64()),
            "mmd2_biased": pa.array([result.mmd2_biased[a, b] for a, b in pairs], pa.float64()),
            "mmd": pa.array([result.mmd[a, b] for a, b in pairs], pa.float64()),
            "p_value": pa.array([None if p is None else p[a, b] for a, b in pairs], pa.float64()),
            "n_a": pa.array([n[a] for a, _ in pairs], pa.int64()),
            "n_b": pa.array([n[b] for _, b in pairs], pa.int64()),
        }
    )
    write_parquet_atomic(st.dir / "mmd.parquet", table)
    write_json_atomic(
        st.dir / "mmd.json",
        {
            "sources": names,
            "kinds": kinds,
            "n": n,
            "sigma": sigma,
            "sigmas": list(result.sigmas),
            "bandwidth_factors": config.bandwidth_factors,
            "estimator": result.statistic,
            "method": result.method,
            "permutations": result.permutations,
            "alpha": config.alpha,
            "normalisation": normalisation,
            "mmd2_unbiased": result.mmd2_unbiased.tolist(),
            "mmd2_biased": result.mmd2_biased.tolist(),
            "mmd": result.mmd.tolist(),
            "normalised_mmd": normalised.tolist(),
            "p_values": None if p is None else p.tolist(),
        },
    )
    write_json_atomic(st.dir / "summary.json", _summary(result, kinds, config, sigma))
    title = f"Pairwise MMD between datasets ({result.method}, {result.statistic} MMD², σ = {sigma:.4g})"
    plot_mmd_heatmap(normalised, names, kinds, st.dir / "mmd_heatmap.png", title, normalisation, p, config.alpha)
    st.counts["written"] = len(pairs)


def _write_maps(st: StageRun, pool: _Pool, config: GapConfig, reported: set[int]) -> None:
    sources = list(pool.rows)
    quota = stratified_quota([len(pool.rows[s]) for s in sources], config.tsne_max_points)
    feats, rows, labels = [], [], []
    with st.timed("map_load"):
        for source, k in zip(sources, quota):
            f, r = _load_finite(
                pool, st, source, _seeded_sample(pool.rows[source], k, config.seed, source, "map"), reported
            )
            feats.append(f)
            rows.append(r)
            labels.extend([source] * len(r))
    x = np.concatenate(feats)
    all_rows = np.concatenate(rows)
    if len(x) < 5:
        st.log.warning("map skipped: only %d points with finite features", len(x))
        st.extra["map"] = f"skipped: {len(x)} points"
        return
    with st.timed("pca"):
        reduced = pca_reduce(x, config.pca_dim, config.seed)
    ids = np.array(pool.fs.ids_of(all_rows), dtype=object)
    kinds = [pool.kinds[s] for s in labels]
    with st.timed("tsne"):
        coords, perplexity = tsne_map(reduced, config.perplexity, config.seed, config.n_jobs, config.tsne_iterations)
        st.extra["tsne"] = {"points": len(coords), "perplexity": perplexity, "pca_dim": reduced.shape[1]}
    table = pa.table(
        {
            "id": pa.array(ids.tolist(), pa.string()),
            "source": labels,
            "kind": kinds,
            "x": coords[:, 0],
            "y": coords[:, 1],
        }
    )
    write_parquet_atomic(st.dir / "tsne.parquet", table)
    plot_feature_map(
        coords,
        labels,
        pool.kinds,
        st.dir / "tsne.png",
        f"t-SNE of frozen-VLM features ({len(coords)} points, stratified by source; "
        f"PCA to {reduced.shape[1]}, perplexity {perplexity:g})",
    )
    st.counts["map_points"] = len(x)


# --------------------------------------------------------------------------- the stage


def measure_gap(config: GapConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Pairwise MMD (with permutation p-values), the heatmap, the summary and the t-SNE map."""
    features_dir = Path(config.features) if config.features is not None else run_dir.require("featurize")
    with stage_run(run_dir, "gap", config, inputs=[features_dir], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        reported: set[int] = set()
        with st.timed("load"):
            pool = _open_pool(features_dir, config)
            datasets = _load_subsamples(pool, config, st, reported)
        kinds = [pool.kinds[s] for s in datasets]
        try:
            with st.timed("bandwidth"):
                if config.sigma is not None:
                    sigma, how = float(config.sigma), "fixed"
                else:
                    pooled = np.concatenate(list(datasets.values()))
                    sigma = median_heuristic(pooled, config.median_sample_size, config.seed)
                    how = f"median heuristic over {min(len(pooled), config.median_sample_size)} pooled points"
                sigmas = bandwidths(sigma, config.bandwidth_factors)
            st.log.info(
                "%d datasets, sigma %.5g (%s), %s estimator, %d permutations per pair",
                len(datasets),
                sigma,
                how,
                config.estimator,
                config.permutations,
            )
            D = len(datasets)
            with st.timed("mmd"), st.progress(total=D * (D + 1) // 2, desc="gap: MMD tiles", unit="tile") as bar:
                common = dict(
                    permutations=config.permutations,
                    statistic=config.estimator,
                    seed=config.seed,
                    block_budget_mb=config.block_budget_mb,
                    device=config.device,
                    progress=bar.update,
                )
                if config.method == "exact":
                    result = mmd_matrix(datasets, sigmas, **common)
                else:
                    result = mmd_matrix_rff(datasets, sigmas, num_features=config.rff_features, **common)
        except GapInputError as exc:
            raise StageError(f"{features_dir}: {exc}") from None
        st.extra.update(
            {
                "sigma": sigma,
                "sigmas": list(sigmas),
                "bandwidth": how,
                "estimator": config.estimator,
                "method": result.method,
                "permutations": config.permutations,
                "datasets": len(datasets),
                "n_per_dataset": dict(zip(result.names, result.sizes)),
                "mmd_compute": {
                    "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
                    "gflop": {k: round(v / 1e9, 3) for k, v in result.flops.items()},
                },
            }
        )
        with st.timed("write"):
            _write_mmd(st, result, kinds, config, sigma)
        if config.tsne:
            _write_maps(st, pool, config, reported)
    return st.dir
