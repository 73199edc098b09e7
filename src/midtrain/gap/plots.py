"""Figures of the gap stage: the normalised MMD heatmap and the 2-D feature maps (PNG, Agg).

:func:`new_figure` and :func:`save_png` are the figure plumbing of every stage that draws (gap,
select, report): no pyplot or global backend state, and the PNG written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..figures import new_figure, save_png


def plot_mmd_heatmap(
    normalised: np.ndarray,
    names: Sequence[str],
    kinds: Sequence[str],
    path: Path,
    title: str,
    normalisation: str,
    p_values: np.ndarray | None = None,
    alpha: float = 0.05,
) -> None:
    """Heatmap of the ``[D, D]`` normalised MMD matrix, sources ordered VLM then VLA.

    The group boundary is drawn as lines, the groups are labelled above the columns and in the tick labels;
    the title (``title`` on the first line) states the ``normalisation``. With ``p_values``, pairs that are *not*
    significant at ``alpha`` are marked ``ns``.
    """
    D = len(names)
    size = max(5.0, 0.45 * D + 2.5)
    fig = new_figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=max(1.0, float(np.nanmax(normalised))))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="normalised MMD")
    labels = [f"{n} [{k.upper()}]" for n, k in zip(names, kinds)]
    ax.set_xticks(range(D), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(D), labels, fontsize=8)
    if D <= 24:
        for i in range(D):
            for j in range(D):
                if i == j:
                    continue
                text = f"{normalised[i, j]:.2f}"
                if p_values is not None and p_values[i, j] > alpha:
                    text += "\nns"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if normalised[i, j] < 0.6 else "black",
                )
    vlm = [i for i, k in enumerate(kinds) if k == "vlm"]
    vla = [i for i, k in enumerate(kinds) if k == "vla"]
    if vlm and vla:
        boundary = max(vlm) + 0.5
        ax.axhline(boundary, color="red", linewidth=2)
        ax.axvline(boundary, color="red", linewidth=2)
    for group, members in (("VLM", vlm), ("VLA", vla)):
        if members:
            centre = (min(members) + max(members)) / 2
            ax.text(centre, -0.6, group, ha="center", va="bottom", fontsize=11, fontweight="bold", color="red")
    note = f"; 'ns' = not significant at alpha={alpha:g}" if p_values is not None else ""
    ax.set_title(f"{title}\n{normalisation}{note}", fontsize=9, pad=30)
    save_png(fig, path, bbox_inches="tight")


def plot_feature_map(coords: np.ndarray, sources: Sequence[str], kinds: dict[str, str], path: Path, title: str) -> None:
    """Scatter of a 2-D map coloured by source; VLA sources drawn on top, larger and outlined."""
    import matplotlib

    sources = np.asarray(sources)
    fig = new_figure(9.0, 7.0)
    ax = fig.add_subplot(1, 1, 1)
    muted, strong = matplotlib.colormaps["tab20"], matplotlib.colormaps["Set1"]
    vlm_style = dict(s=5, alpha=0.5, linewidths=0)
    vla_style = dict(s=16, alpha=0.9, marker="^", edgecolors="black", linewidths=0.3)
    groups = [  # VLM (and any other kind) muted and underneath, VLA on top: large outlined triangles
        ([s for s in kinds if kinds[s] != "vla"], "VLM", lambda i: muted((2 * i) % 20), vlm_style),
        ([s for s in kinds if kinds[s] == "vla"], "VLA", lambda i: strong(i % 9), vla_style),
    ]
    for members, group, colour, style in groups:
        for i, source in enumerate(members):
            sel = sources == source
            label = f"{source} ({group})"
            ax.scatter(coords[sel, 0], coords[sel, 1], color=colour(i), label=label, rasterized=True, **style)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    legend = ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=2, frameon=False)
    for text in legend.get_texts():
        if text.get_text().endswith("(VLA)"):
            text.set_fontweight("bold")
    save_png(fig, path, bbox_inches="tight")
