"""The selection report: does the selection move towards the VLA data, and what does it keep?

Written into ``select/``:

- ``selection_metrics.json``: K, pool size, per-source shares of pool and selection,
  ``mmd_selection_vla`` next to ``mmd_random_vla`` (a uniformly random selection of the
  same K - the selection objective, so the learned selection should be smaller), the
  RBF bandwidth ``sigma`` (median heuristic, shared by both), and the paper's
  diversity metric, inverse uniformity ``1 / E[exp(-2 ||u - v||^2)]`` on L2-normalised
  features, for the pool, the selection and the VLA set;
- ``report/pool_vs_selection.png`` (per-source share bars), ``report/score_distributions.png``
  (per-source score histograms, the paper's Fig. 4a), ``report/gallery.json`` (the
  highest- and lowest-scoring pool samples with text and image references, Fig. 4b/c)
  and ``report/gallery_{top,bottom}_NN.png`` thumbnails.

Distribution metrics use seeded subsamples of at most ``metric_samples`` rows per set.
The MMD here is a minimal self-contained estimator (stages do not import each other);
the ``gap`` stage has the full treatment (permutation tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..data.catalog import iter_catalog
from ..data.features import FeatureSet
from ..data.images import load_image
from ..runs import SampleError, StageError, StageRun, write_json_atomic
from .pool import VLA_KIND, FeatureRun, select_rows

TEXT_CHARS = 1000


# --------------------------------------------------------------------------- distribution metrics


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y).pow_(2)


def median_bandwidth(z: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """Median pairwise L2 distance (distinct pairs) of up to ``max_rows`` rows of ``z``."""
    if len(z) > max_rows:
        z = z[np.random.default_rng(seed).choice(len(z), max_rows, replace=False)]
    t = torch.from_numpy(np.asarray(z, dtype=np.float64))
    d = torch.cdist(t, t)
    iu = torch.triu_indices(len(t), len(t), offset=1)
    med = float(d[iu[0], iu[1]].median())
    return med if med > 0 else 1.0


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Unbiased MMD^2 with the RBF kernel ``exp(-||a - b||^2 / (2 sigma^2))`` (paper eq. 1)."""
    X, Y = torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y, np.float64))
    g = 1.0 / (2.0 * sigma * sigma)
    m, n = len(X), len(Y)
    kxx = torch.exp(-g * pairwise_sq_dists(X, X))
    kyy = torch.exp(-g * pairwise_sq_dists(Y, Y))
    kxy = torch.exp(-g * pairwise_sq_dists(X, Y))
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def inverse_uniformity(x: np.ndarray) -> float:
    """``1 / E_{u != v}[exp(-2 ||u - v||^2)]`` on L2-normalised rows (higher = more diverse)."""
    X = torch.from_numpy(np.asarray(x, np.float64))
    X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = torch.exp(-2.0 * pairwise_sq_dists(X, X))
    m = len(X)
    return float(m * (m - 1) / (k.sum() - k.diagonal().sum()))


def feature_rows_for_ids(fs: FeatureSet, ids: pa.Array) -> np.ndarray:
    """Global feature rows of ``ids`` (aligned; -1 where absent), streaming the shards' id files."""
    out = np.full(len(ids), -1, dtype=np.int64)
    offset = 0
    for name in fs.names:
        shard_ids = fs.ids(name).column("id")
        pos = pc.index_in(shard_ids, value_set=ids)
        hit = np.flatnonzero(pc.is_valid(pos).to_numpy(zero_copy_only=False))
        if len(hit):
            out[pos.to_numpy(zero_copy_only=False)[hit].astype(np.int64)] = hit + offset
        offset += len(shard_ids)
    return out


def _features_of(fs: FeatureSet, ids: pa.Array, what: str, st: StageRun) -> np.ndarray:
    rows = feature_rows_for_ids(fs, ids)
    missing = int((rows < 0).sum())
    if missing:
        raise StageError(
            f"{fs.root}: {missing} {what} sample(s) have no features (first: {ids[int(np.flatnonzero(rows < 0)[0])]}); "
            "the score file and the feature run do not match - re-run `midtrain score`"
        )
    x = fs.take(rows)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        st.log.warning("%d %s feature row(s) with NaN/inf left out of the distribution metrics", int((~finite).sum()), what)
    return x[finite]


def distribution_metrics(st: StageRun, config, result, fr: FeatureRun) -> dict:
    fs = fr.features
    rng = np.random.default_rng(config.seed)
    m = config.metric_samples
    ids = result.table.column("id")
    sel_rows = np.flatnonzero(result.selected)
    elig_rows = np.flatnonzero(result.eligible)
    sel = rng.choice(sel_rows, min(m, len(sel_rows)), replace=False)
    # a uniform subsample of a uniformly random K-subset is a uniform subsample of the pool
    rand = rng.choice(elig_rows, min(m, result.k), replace=False)
    pool = rng.choice(elig_rows, min(m, len(elig_rows)), replace=False)
    vla_rows = select_rows(fs, VLA_KIND, config.vla_sources)
    vla_rows = np.sort(rng.choice(vla_rows, min(m, len(vla_rows)), replace=False))
    X_sel = _features_of(fs, ids.take(pa.array(sel)), "selected", st)
    X_rand = _features_of(fs, ids.take(pa.array(rand)), "random-selection", st)
    X_pool = _features_of(fs, ids.take(pa.array(pool)), "pool", st)
    X_vla = fs.take(vla_rows)
    X_vla = X_vla[np.isfinite(X_vla).all(axis=1)]
    if min(len(X_sel), len(X_rand), len(X_vla)) < 2:
        return {"distribution_metrics": f"skipped: need >= 2 rows per set, got selection {len(X_sel)}, "
                                        f"random {len(X_rand)}, VLA {len(X_vla)}"}  # fmt: skip
    sigma = median_bandwidth(np.concatenate([X_sel, X_rand, X_vla]), seed=config.seed)
    mmd_sel, mmd_rand = mmd2_unbiased(X_sel, X_vla, sigma), mmd2_unbiased(X_rand, X_vla, sigma)
    return {
        "mmd_selection_vla": float(np.sqrt(max(mmd_sel, 0.0))),
        "mmd_random_vla": float(np.sqrt(max(mmd_rand, 0.0))),
        "mmd2_selection_vla": mmd_sel,
        "mmd2_random_vla": mmd_rand,
        "mmd_sigma": sigma,
        "mmd_kernel": "rbf, median heuristic over selection + random + VLA subsamples; unbiased MMD^2",
        "metric_samples": {"selection": len(X_sel), "random": len(X_rand), "pool": len(X_pool), "vla": len(X_vla)},
        "diversity_pool": inverse_uniformity(X_pool),
        "diversity_selection": inverse_uniformity(X_sel),
        "diversity_vla": inverse_uniformity(X_vla),
        "diversity_metric": "inverse uniformity 1/E[exp(-2||u-v||^2)] on L2-normalised features",
    }


# --------------------------------------------------------------------------- shares and figures


def per_source_shares(result) -> list[dict]:
    sources = result.table.column("source").to_numpy(zero_copy_only=False)
    elig, sel = result.eligible, result.selected
    names, pool_counts = np.unique(sources[elig], return_counts=True)
    out = []
    for name, count in zip(names, pool_counts):
        n_sel = int((sel & (sources == name)).sum())
        out.append({"source": str(name), "pool_count": int(count), "pool_share": float(count / elig.sum()),
                    "selected_count": n_sel, "selection_share": float(n_sel / result.k),
                    "selection_rate": float(n_sel / count)})  # fmt: skip
    return out


def plot_pool_vs_selection(shares: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["source"] for s in shares]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(names)))
    ax.barh(y - 0.2, [s["pool_share"] for s in shares], 0.4, label="pool")
    ax.barh(y + 0.2, [s["selection_share"] for s in shares], 0.4, label="selection")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("share of samples")
    ax.set_title("Per-source share: pool vs selection")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_score_distributions(result, path: Path, threshold: float | None, scorer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result.table.column("score").to_numpy(zero_copy_only=False)[result.eligible]
    sources = result.table.column("source").to_numpy(zero_copy_only=False)[result.eligible]
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 51)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in np.unique(sources):
        s = scores[sources == name]
        ax.hist(s, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{name} (mean {s.mean():.3g})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="top-K threshold")
    ax.set_xlabel(f"{scorer} score (higher = closer to VLA)")
    ax.set_ylabel("density")
    ax.set_title("Per-source score distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- gallery


def _catalog_rows(catalog_dir: Path, ids: list[str]) -> dict[str, dict]:
    wanted = pa.array(ids, type=pa.string())
    found: dict[str, dict] = {}
    cols = ["id", "source", "messages", "instruction", "image_refs", "origin"]
    for batch in iter_catalog(catalog_dir, columns=cols):
        mask = pc.is_in(batch.column("id"), value_set=wanted)
        if pc.any(mask).as_py():
            for row in batch.filter(mask).to_pylist():
                found[row["id"]] = row
            if len(found) == len(ids):
                break
    return found


def write_gallery(st: StageRun, config, result, catalog_dir: Path | None, report_dir: Path) -> dict:
    """gallery.json with the top and bottom ``gallery_size`` eligible samples, plus thumbnails."""
    order_rows = np.flatnonzero(result.eligible)  # table is sorted by rank
    g = config.gallery_size
    sides = {"top": order_rows[:g], "bottom": order_rows[::-1][:g]}
    t = result.table
    items = {side: [{"id": str(t.column("id")[int(r)]), "source": str(t.column("source")[int(r)]),
                     "score": float(t.column("score")[int(r)].as_py()), "rank": int(t.column("rank")[int(r)].as_py())}
                    for r in rows] for side, rows in sides.items()}  # fmt: skip
    gallery: dict = {"scorer": result.scorer, **items}
    if catalog_dir is None:
        gallery["note"] = "catalog stage not complete in this run: no text or images"
        st.log.warning("selection gallery without text/images: the catalog stage is not complete")
        return gallery
    rows = _catalog_rows(catalog_dir, [it["id"] for side in items.values() for it in side])
    for side, side_items in items.items():
        for i, item in enumerate(side_items):
            row = rows.get(item["id"])
            if row is None:
                item["error"] = "not found in the catalog"
                continue
            item["messages"] = [{"role": m["role"], "content": m["content"][:TEXT_CHARS]} for m in row.get("messages") or []]
            if row.get("instruction"):
                item["instruction"] = row["instruction"][:TEXT_CHARS]
            item["origin"] = row.get("origin")
            refs = row.get("image_refs") or []
            item["image_refs"] = [{"path": r.get("path"), "embedded": r.get("bytes") is not None} for r in refs]
            if refs:
                try:
                    img = load_image(refs[0], row.get("origin") or item["id"], item["id"])
                    img.thumbnail((config.thumbnail_px, config.thumbnail_px))
                    name = f"gallery_{side}_{i:02d}.png"
                    img.save(report_dir / name)
                    item["thumbnail"] = name
                except SampleError as exc:
                    item["image_error"] = str(exc)
                    st.log.warning("gallery image of %s: %s", item["id"], exc)
    return gallery


# --------------------------------------------------------------------------- entry point


def write_selection_report(st: StageRun, config, result, fr: FeatureRun | None, catalog_dir: Path | None) -> dict:
    report_dir = st.dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = result.summary()
    scores = result.table.column("score").to_numpy(zero_copy_only=False)
    metrics["mean_score_pool"] = float(scores[result.eligible].mean())
    metrics["mean_score_selection"] = float(scores[result.selected].mean())
    shares = per_source_shares(result)
    metrics["per_source"] = shares
    plot_pool_vs_selection(shares, report_dir / "pool_vs_selection.png")
    threshold = float(scores[result.selected].min()) if result.method == "top_k" else None
    plot_score_distributions(result, report_dir / "score_distributions.png", threshold, result.scorer)
    if fr is not None:
        with st.timed("distribution_metrics"):
            metrics.update(distribution_metrics(st, config, result, fr))
    else:
        metrics["distribution_metrics"] = "skipped: no feature run (featurize stage not complete and `features:` not set)"
        st.log.warning("selection report without MMD/diversity: no feature run")
    gallery = write_gallery(st, config, result, catalog_dir, report_dir)
    write_json_atomic(report_dir / "gallery.json", gallery)
    return metrics
