"""The sft stage's composition figure (its loss curves come from :mod:`midtrain.train.plots`)."""

from __future__ import annotations

from pathlib import Path

from ..figures import new_figure, save_png


def plot_composition(composition: dict, path: Path) -> None:
    """Training samples and tokens drawn per source (horizontal bars, share of the total)."""
    sources = sorted(composition["sources"])
    per = composition["sources"]
    fig = new_figure(6.4, 0.5 * len(sources) + 1.6)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, label in ((axes[0], "train_samples", "samples"), (axes[1], "train_tokens", "tokens")):
        total = sum(per[s][key] for s in sources) or 1
        ax.barh(range(len(sources)), [per[s][key] / total for s in sources], color="#4c72b0")
        for i, s in enumerate(sources):
            ax.text(per[s][key] / total, i, f" {per[s][key]:,}", va="center", fontsize=7)
        ax.set_xlabel(f"share of training {label}")
        ax.set_xlim(0, 1.15)
    axes[0].set_yticks(range(len(sources)), sources, fontsize=8)
    budget = f", budget {composition['budget']:,} {composition['unit']}" if composition.get("budget") else ""
    fig.suptitle(f"drawn composition (seed {composition['seed']}{budget})", fontsize=10)
    save_png(fig, path, bbox_inches="tight")
