"""Sequential evaluation in a study: closed-loop episodes in rounds until every named comparison
is decided or the rounds are spent (``sequential:`` in the config; the test is
:mod:`midtrain.experiments.study.sequential`'s).

Round 1 is the closed loop every final VLA already runs (``eval.episodes_per_task`` episodes per
task from ``eval.seed``). Round ``k >= 2`` evaluates every row's final policy of every seed on as
many new episodes, from ``eval.seed + k - 1`` (new initial states, the same for every row and
seed, so the rows stay paired), with ``midtrain eval`` in the nested run directory
``rounds/<row>_s<seed>_r<k>/``. After round ``k`` every comparison of ``sequential.compare`` is
tested at look ``k`` of ``sequential.rounds`` (information fraction ``k / rounds``); the study
stops once every one has crossed its boundary. Everything is recomputed from the episode files
(:func:`sequential_record`), so a rerun takes the same decisions and skips the rounds it has.
Every row is evaluated in every round it reaches, so the table keeps one protocol for all rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ...runs import RunDir
from ..runner import StageCall, episode_successes
from .sequential import boundaries, z_statistic

ROUNDS_DIR = "rounds"
Episodes = dict[str, list[bool]]  # task -> success of episode 0, 1, ...


def episodes_table(path: Path) -> Episodes:
    """``{task: [success of episode 0, 1, ...]}`` from an ``episodes.parquet`` (episodes in index order)."""
    return episode_successes(path)


def round_run(run: RunDir, row: str, seed: int, k: int) -> RunDir:
    """The nested run directory of round ``k`` (>= 2) of ``row``'s final VLA of ``seed``."""
    return RunDir(run.root / ROUNDS_DIR / f"{row}_s{seed}_r{k}")


def round_episodes(run: RunDir, row: str, seed: int, k: int) -> Optional[Episodes]:
    """The episodes of round ``k`` once its evaluation is complete, else None."""
    sub = round_run(run, row, seed, k)
    man = sub.manifest("eval")
    path = sub.stage_dir("eval") / "episodes.parquet"
    return episodes_table(path) if man and man.get("status") == "complete" and path.is_file() else None


def merge_rounds(rounds: list[Episodes]) -> Episodes:
    """Per task, the episodes of every round in order (round 2's first episode follows round 1's last)."""
    out: Episodes = {t: list(v) for t, v in rounds[0].items()}
    for more in rounds[1:]:
        if set(more) != set(out):
            raise ValueError(f"sequential rounds evaluated different tasks: {sorted(out)} then {sorted(more)}")
        for t, v in more.items():
            out[t] += v
    return out


def sequential_record(config, first: dict[tuple[str, int], Optional[Episodes]], run: RunDir) -> Optional[dict]:
    """The sequential test so far: ``first[(row, seed)]`` is round 1 (the final VLA's closed loop);
    later rounds are read from ``rounds/``. ``stopped``: ``decided`` (every named comparison
    crossed its boundary), ``budget`` (all rounds run), ``continue`` (run round ``rounds_run + 1``),
    ``incomplete`` (a final VLA has no closed loop). None without sequential evaluation."""
    seq = config.sequential
    if seq.rounds <= 1:
        return None
    fractions = [k / seq.rounds for k in range(1, seq.rounds + 1)]
    bounds = boundaries(fractions, seq.alpha, seq.spending)
    pairs = [tuple(c.split(" - ")) for c in seq.compare]
    so_far: dict[tuple[str, int], list[Episodes]] = {key: [] for key in first}
    z: dict[str, list[float]] = {c: [] for c in seq.compare}
    looks, stopped = 0, "continue"
    for k in range(1, seq.rounds + 1):
        this = {key: (eps if k == 1 else round_episodes(run, key[0], key[1], k)) for key, eps in first.items()}
        if any(v is None for v in this.values()):
            stopped = "incomplete" if k == 1 else stopped  # a final VLA without its closed loop: nothing to add to
            break
        for key, eps in this.items():
            so_far[key].append(eps)
        looks = k
        for c, (a, b) in zip(seq.compare, pairs):
            diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
                     for x, y in zip(*(_per_task(so_far, row, config.seeds) for row in (a, b)))]  # fmt: skip
            z[c].append(round(z_statistic(diffs), 4))
        if all(any(abs(v) >= c for v, c in zip(z[name], bounds)) for name in seq.compare):
            stopped = "decided"
            break
        if k == seq.rounds:
            stopped = "budget"
    comparisons = {}
    for name in seq.compare:
        crossed = [j for j, (v, c) in enumerate(zip(z[name], bounds)) if abs(v) >= c]
        comparisons[name] = {"z": z[name], "decided": bool(crossed), "look": crossed[0] + 1 if crossed else None}
    return {"rounds": seq.rounds, "rounds_run": looks, "episodes_per_task_per_round": config.eval.episodes_per_task,
            "fractions": [round(f, 4) for f in fractions], "boundaries": [round(c, 4) for c in bounds],
            "spending": seq.spending, "alpha": seq.alpha, "stopped": stopped, "comparisons": comparisons,
            "method": "group-sequential test, Lan-DeMets alpha spending over the rounds (midtrain.experiments.study.sequential)"}  # fmt: skip


def _per_task(so_far: dict[tuple[str, int], list[Episodes]], row: str, seeds: list[int]) -> list[np.ndarray]:
    """Per task ``[seeds, episodes so far]`` of ``row``."""
    merged = [merge_rounds(so_far[(row, s)]) for s in seeds]
    return [np.stack([m[t] for m in merged]) for t in merged[0]]


def first_round(run: RunDir, config, plans) -> dict[tuple[str, int], Optional[Episodes]]:
    """Round 1 of every ``(row, seed)``: the last closed loop of its complete final VLA stage (None if none)."""
    out: dict[tuple[str, int], Optional[Episodes]] = {}
    for row, rs in zip(config.rows, plans):
        for seed, name in rs.finals.items():
            files = sorted((run.stage_dir(name) / "closed_loop").glob("step-*/episodes.parquet"))
            complete = (run.manifest(name) or {}).get("status") == "complete"
            out[(row.name, seed)] = episodes_table(files[-1]) if files and complete else None
    return out


def run_rounds(ctx: Any, plans: list, settings: dict[str, Any],
               run_wave: Callable[[list[StageCall]], dict[str, Optional[Path]]]) -> Optional[dict]:  # fmt: skip
    """Run rounds until :func:`sequential_record` stops (module docstring); ``settings`` is the
    closed-loop protocol (``closed_loop`` keys), ``run_wave(calls)`` runs a round's evaluations at
    once (:meth:`~midtrain.experiments.runner.StageRunner.run_wave`: ``{label: folder, or None
    when its worker died}``). A round with an evaluation that did not finish ends the rounds (the
    study reports it missing; a rerun continues). Returns the record."""
    cfg = ctx.config
    while True:
        record = sequential_record(cfg, first_round(ctx.run, cfg, plans), ctx.run)
        if record is None or record["stopped"] != "continue":
            return record
        k = record["rounds_run"] + 1
        calls = []
        for seed in cfg.seeds:
            for row, rs in zip(cfg.rows, plans):
                policy = ctx.run.stage_dir(rs.finals[seed]) / "policy"
                mapping = {**settings, "seed": settings["seed"] + k - 1, "policy": str(policy), "on_error": cfg.on_error}
                sub = round_run(ctx.run, row.name, seed, k)
                calls.append(StageCall("eval", mapping, sub, f"{ROUNDS_DIR}/{sub.root.name}", f"sequential round {k}: {row.name} seed {seed}"))
        if any(folder is None for folder in run_wave(calls).values()):
            return sequential_record(cfg, first_round(ctx.run, cfg, plans), ctx.run)


def round_manifests(run: RunDir) -> dict[str, Path]:
    """The manifests of the rounds run so far (inputs of the study's aggregate)."""
    root = run.root / ROUNDS_DIR
    return {f"{ROUNDS_DIR}/{p.parent.parent.name}": p for p in sorted(root.glob("*/eval/manifest.json"))} if root.is_dir() else {}
