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

Distribution metrics use seeded subsamples of at most ``metric_samples`` rows per set. The MMD
is the gap stage's estimator (:mod:`midtrain.gap.mmd`), without permutation tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..data.catalog import catalog_rows_by_id
from ..data.features import VLA_KIND, FeatureRun, FeatureSet, load_finite_rows, select_rows
from ..data.images import load_image
from ..runs import SampleError, StageError, StageRun, atomic_path, write_json_atomic

TEXT_CHARS = 1000


# --------------------------------------------------------------------------- distribution metrics


def selection_mmd(x_sel: np.ndarray, x_rand: np.ndarray, x_vla: np.ndarray, seed: int) -> dict:
    """Unbiased MMD^2 of the selection and of the random selection to the VLA set, with one RBF
    bandwidth ``sigma`` (median heuristic over the three subsamples pooled), computed by the gap
    stage's estimator (:func:`midtrain.gap.mmd.mmd_matrix`, float32 kernel tiles, float64 sums)."""
    from ..gap.mmd import GapInputError, median_heuristic, mmd_matrix

    try:
        sigma = median_heuristic(np.concatenate([x_sel, x_rand, x_vla]), max_points=2000, seed=seed)
    except GapInputError:  # every pooled point equal: any bandwidth gives MMD 0
        sigma = 1.0
    m = mmd_matrix({"selection": x_sel, "random": x_rand, "vla": x_vla}, (sigma,), statistic="unbiased", device="cpu")
    return {"sigma": sigma, "selection": float(m.mmd2_unbiased[0, 2]), "random": float(m.mmd2_unbiased[1, 2])}


def inverse_uniformity(x: np.ndarray) -> float:
    """``1 / E_{u != v}[exp(-2 ||u - v||^2)]`` on L2-normalised rows (higher = more diverse)."""
    from ..gap.mmd import rbf_kernel

    X = np.asarray(x, np.float64)
    X = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    k = rbf_kernel(X, X, (0.5,)).double()  # exp(-d^2 / (2 * 0.5^2)) = exp(-2 d^2)
    m = len(X)
    return float(m * (m - 1) / (k.sum() - k.diagonal().sum()))


def _features_of(fs: FeatureSet, ids: pa.Array, what: str, st: StageRun) -> np.ndarray:
    rows = fs.rows_of_ids(ids)
    missing = int((rows < 0).sum())
    if missing:
        raise StageError(
            f"{fs.root}: {missing} {what} sample(s) have no features (first: {ids[int(np.flatnonzero(rows < 0)[0])]}); "
            "the score file and the feature run do not match - re-run `midtrain score`"
        )
    return _finite(fs, rows, what, st)


def _finite(fs: FeatureSet, rows: np.ndarray, what: str, st: StageRun) -> np.ndarray:
    def warn(bad: np.ndarray) -> None:
        st.log.warning("%d %s feature row(s) with NaN/inf left out of the distribution metrics", len(bad), what)

    return load_finite_rows(fs, rows, warn)[0]


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
    X_vla = _finite(fs, vla_rows, "VLA", st)
    if min(len(X_sel), len(X_rand), len(X_vla)) < 2:
        return {"distribution_metrics": f"skipped: need >= 2 rows per set, got selection {len(X_sel)}, "
                                        f"random {len(X_rand)}, VLA {len(X_vla)}"}  # fmt: skip
    mmd = selection_mmd(X_sel, X_rand, X_vla, config.seed)
    sigma, mmd_sel, mmd_rand = mmd["sigma"], mmd["selection"], mmd["random"]
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
    from ..figures import new_figure, save_png

    names = [s["source"] for s in shares]
    y = np.arange(len(names))
    fig = new_figure(7, 1.2 + 0.45 * len(names), dpi=100)
    ax = fig.subplots()
    ax.barh(y - 0.2, [s["pool_share"] for s in shares], 0.4, label="pool")
    ax.barh(y + 0.2, [s["selection_share"] for s in shares], 0.4, label="selection")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("share of samples")
    ax.set_title("Per-source share: pool vs selection")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_score_distributions(result, path: Path, threshold: float | None, scorer: str) -> None:
    from ..figures import new_figure, save_png

    scores = result.table.column("score").to_numpy(zero_copy_only=False)[result.eligible]
    sources = result.table.column("source").to_numpy(zero_copy_only=False)[result.eligible]
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 51)
    fig = new_figure(7, 4, dpi=100)
    ax = fig.subplots()
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
    save_png(fig, path)


# --------------------------------------------------------------------------- gallery


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
    cols = ["id", "source", "messages", "instruction", "image_refs", "origin"]
    rows = catalog_rows_by_id(catalog_dir, [it["id"] for side in items.values() for it in side], cols)
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
                    with atomic_path(report_dir / name) as tmp:
                        img.save(tmp, format="PNG")
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
