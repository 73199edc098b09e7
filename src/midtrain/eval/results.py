"""Success rates with Wilson 95% intervals, ``episodes.parquet`` and ``results.json``.

Wilson score interval for k successes in n episodes (z = 1.96)::

    p = k / n,  centre = (p + z^2 / 2n) / (1 + z^2 / n),
    half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0/n or n/n,
which closed-loop evaluations with 10-50 episodes per task hit often. The mean over tasks is
the unweighted mean of the task rates; its interval is Wilson's on the pooled episodes (the
same point estimate when every task has the same number of episodes, as here).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..runs import write_json_atomic, write_parquet_atomic
from .rollout import EpisodeResult

EPISODES_FILE = "episodes.parquet"
RESULTS_FILE = "results.json"
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def episodes_table(results: Iterable[EpisodeResult], instructions: dict[str, str], out_dir: Path):
    """One row per episode (task, index, seed, initial state, success, length, outcome, failure,
    video path relative to ``out_dir``, timings)."""
    import pyarrow as pa

    rows = sorted(results, key=lambda r: (list(instructions).index(r.task), r.index))
    keys = ("policy_s", "physics_s", "render_s", "codec_s", "reset_s", "wall_s")
    return pa.table({
        "task": pa.array([r.task for r in rows], pa.string()),
        "instruction": pa.array([instructions[r.task] for r in rows], pa.string()),
        "episode": pa.array([r.index for r in rows], pa.int32()),
        "seed": pa.array([r.seed for r in rows], pa.uint64()),
        "init_state": pa.array([r.init_state for r in rows], pa.int32()),
        "success": pa.array([r.success for r in rows], pa.bool_()),
        "length": pa.array([r.length for r in rows], pa.int32()),
        "outcome": pa.array([r.outcome for r in rows], pa.string()),
        "failure": pa.array([r.failure for r in rows], pa.string()),
        "video": pa.array([_relative(r.video, out_dir) for r in rows], pa.string()),
        **{k: pa.array([round(r.timings.get(k, 0.0), 4) for r in rows], pa.float32()) for k in keys},
    })  # fmt: skip


def _relative(path: str | None, out_dir: Path) -> str | None:
    if not path:
        return None
    try:
        return Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def summarize(results: list[EpisodeResult], instructions: dict[str, str]) -> dict[str, Any]:
    """Per-task success with Wilson intervals, the mean over tasks, lengths, error counts."""
    per_task: dict[str, Any] = {}
    for task, instruction in instructions.items():
        mine = sorted((r for r in results if r.task == task), key=lambda r: r.index)
        n, k = len(mine), sum(r.success for r in mine)
        lo, hi = wilson_interval(k, n)
        lengths = [r.length for r in mine]
        per_task[task] = {
            "instruction": instruction, "episodes": n, "successes": k,
            "success_rate": round(k / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)],
            "mean_length": round(float(np.mean(lengths)), 1) if lengths else None,
            "mean_length_of_successes": round(float(np.mean([r.length for r in mine if r.success])), 1)
            if k else None,
            "lengths": lengths, "errors": sum(r.outcome == "error" for r in mine),
        }  # fmt: skip
    rates = [t["success_rate"] for t in per_task.values() if t["success_rate"] is not None]
    n_all, k_all = len(results), sum(r.success for r in results)
    lo, hi = wilson_interval(k_all, n_all)
    return {
        "tasks": per_task,
        "mean_success": round(float(np.mean(rates)), 4) if rates else None,
        "mean_success_ci95": [round(lo, 4), round(hi, 4)],
        "episodes": n_all, "successes": k_all, "errors": sum(r.outcome == "error" for r in results),
        "first_errors": sorted({r.failure for r in results if r.outcome == "error"})[:5],
    }  # fmt: skip


def timing_summary(results: list[EpisodeResult], wall_s: float, workers: int) -> dict[str, Any]:
    """Episodes per minute, and where episode time went (summed over workers)."""
    parts = ("policy_s", "physics_s", "render_s", "codec_s", "reset_s")
    sums = {k: float(sum(r.timings.get(k, 0.0) for r in results)) for k in parts}
    episode_s = float(sum(r.timings.get("wall_s", 0.0) for r in results))
    other = max(0.0, episode_s - sum(sums.values()))
    total = sum(sums.values()) + other
    return {
        "wall_s": round(wall_s, 2), "workers": workers,
        "episodes_per_minute": round(60 * len(results) / wall_s, 2) if wall_s > 0 else None,
        "steps": int(sum(r.length for r in results)),
        "seconds": {**{k: round(v, 3) for k, v in sums.items()}, "other_s": round(other, 3)},
        "shares": {k[:-2]: round(v / total, 4) if total else None for k, v in {**sums, "other_s": other}.items()},
    }  # fmt: skip


def write_outputs(out_dir: Path, results: list[EpisodeResult], instructions: dict[str, str], summary: dict) -> None:
    write_parquet_atomic(Path(out_dir) / EPISODES_FILE, episodes_table(results, instructions, out_dir))
    write_json_atomic(Path(out_dir) / RESULTS_FILE, summary)
