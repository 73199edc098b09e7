"""Figures of the sft stage (PNG, Agg canvas, no pyplot state): the loss curves and the drawn composition."""

from __future__ import annotations

from pathlib import Path

from ..runs import atomic_path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_loss_curves(rows: list[dict], path: Path, title: str) -> None:
    """Training loss (each metrics row: the weighted mean since the previous row) and validation
    loss against the optimizer step, from ``metrics.jsonl`` rows."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), color="#1f77b4", lw=1.2, label="train (answer-token cross-entropy)")
    if val:
        ax.plot(*zip(*val), "o-", color="#d62728", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / answer token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def plot_composition(composition: dict, path: Path) -> None:
    """Training samples and tokens drawn per source (horizontal bars, share of the total)."""
    sources = sorted(composition["sources"])
    per = composition["sources"]
    fig = _figure(6.4, 0.5 * len(sources) + 1.6)
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
