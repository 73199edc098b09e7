"""Figures of a training run, from its ``metrics.jsonl``: loss curves and closed-loop success.

Both the sft and the vla stage train through :func:`midtrain.train.train`, so one reader of its
metrics rows draws both; the report redraws them for any training stage it finds.
"""

from __future__ import annotations

from pathlib import Path

from ..figures import new_figure, save_png


def plot_loss_curves(rows: list[dict], path: Path, title: str, loss_label: str = "train") -> None:
    """Training loss (each metrics row: the weighted mean since the previous row) and validation
    loss against the optimizer step."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig = new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), color="#1f77b4", lw=1.2, label=loss_label)
    if val:
        ax.plot(*zip(*val), "o-", color="#d62728", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path, bbox_inches="tight")


def closed_loop_rows(rows: list[dict]) -> list[dict]:
    """The closed-loop evaluations a training run logged (``callback: closed_loop`` rows)."""
    return [r for r in rows if r.get("callback") == "closed_loop" and "success" in r]


def plot_closed_loop(rows: list[dict], path: Path, title: str) -> None:
    """Closed-loop success rate against the optimizer step: the mean over tasks and each task
    (the seed's training-dynamics figure)."""
    evals = closed_loop_rows(rows)
    fig = new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in evals]
    tasks = sorted({k.removeprefix("success_") for r in evals for k in r if k.startswith("success_")})
    for task in tasks:
        ax.plot(steps, [r.get(f"success_{task}") for r in evals], lw=0.8, alpha=0.6, label=task)
    ax.plot(steps, [r["success"] for r in evals], "o-", color="black", lw=2, ms=4, label="mean over tasks")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("closed-loop success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path, bbox_inches="tight")
