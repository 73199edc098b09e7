"""Sequential evaluation wired into the study, with a stand-in for `midtrain eval` (no simulation):
rounds run until the named comparison is decided or the budget is spent, each round on new
initial states shared by every row and seed, and study.json pools the rounds' episodes."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midtrain.config import ConfigError, load_config
from midtrain.eval.config import EvalConfig
from midtrain.runs import RunDir
from midtrain.experiments.study.config import StudyConfig
from midtrain.experiments.study.html import study_section_html
from midtrain.experiments.study.config import row_stages
from midtrain.experiments.study.results import collect_results
from midtrain.experiments.study.rounds import ROUNDS_DIR, run_rounds, sequential_record, first_round

ROWS = [{"name": "base"}, {"name": "learned", "steps": [{"sft": {"data": "selection:proximity"}}]},
        {"name": "random", "steps": [{"sft": {"data": "selection:random"}}]}]  # fmt: skip
TASKS, EPISODES, SEEDS = ("reach-v3", "drawer-open-v3"), 8, [0, 1]


def _write_episodes(folder: Path, success) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = [{"task": t, "episode": e, "success": bool(success(t, e))} for t in TASKS for e in range(EPISODES)]
    pq.write_table(pa.Table.from_pylist(table), folder / "episodes.parquet")


def _draw(p: float, *key) -> bool:
    """A reproducible Bernoulli(p) draw for one (row, seed, eval seed, task, episode)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode())).random() < p


class Study:
    """A study whose final VLAs are done (round 1 written), and a stand-in eval stage for later rounds."""

    def __init__(self, root: Path, p_success: dict[str, float], rounds: int = 3):
        self.config = load_config(StudyConfig, base={
            "rows": ROWS, "seeds": SEEDS, "cka": {"enabled": False}, "eval": {"episodes_per_task": EPISODES, "tasks": list(TASKS)},
            "sequential": {"rounds": rounds, "compare": ["learned - random"]}})  # fmt: skip
        self.run, self.p, self.calls, self.waves = RunDir(root), p_success, [], []
        self.plans = [row_stages(r, SEEDS, 1, probe=False) for r in self.config.rows]
        for row, rs in zip(self.config.rows, self.plans):
            for seed, name in rs.finals.items():
                _write_episodes(self.run.stage_dir(name) / "closed_loop" / "step-000010",
                                lambda t, e, r=row.name, s=seed: _draw(self.p[r], r, s, 0, t, e))
                man = {"status": "complete", "train": {"samples": 8}, "timings": {"wall_s": 1.0}}
                (self.run.stage_dir(name) / "manifest.json").write_text(json.dumps(man))

    def eval_stage(self, name: str, run_dir: RunDir, mapping: dict, key: str) -> Path:
        assert name == "eval" and mapping["episodes_per_task"] == EPISODES
        load_config(EvalConfig, base=mapping)  # what midtrain eval would be given is a valid eval config
        row, seed = run_dir.root.name.rsplit("_r", 1)[0].rsplit("_s", 1)
        assert mapping["policy"] == str(self.run.stage_dir(f"vla_{row}_s{seed}") / "policy")
        self.calls.append((row, int(seed), mapping["seed"]))
        out = run_dir.stage_dir("eval")
        _write_episodes(out, lambda t, e: _draw(self.p[row], row, int(seed), mapping["seed"], t, e))
        (out / "manifest.json").write_text(json.dumps({"status": "complete"}))
        return out

    def eval_wave(self, calls) -> dict:
        """One round's evaluations at once (the runner's run_wave)."""
        self.waves.append(len(calls))
        return {c.label: self.eval_stage(c.stage, c.run_dir, c.mapping, c.key) for c in calls}

    def rounds(self) -> dict:
        return run_rounds(self, self.plans, self.config.eval.to_dict(), self.eval_wave)


def test_equal_rows_spend_the_budget_on_new_shared_initial_states(tmp_path):
    study = Study(tmp_path, {"base": 0.5, "learned": 0.5, "random": 0.5})
    record = study.rounds()
    assert record["stopped"] == "budget" and record["rounds_run"] == 3
    assert not record["comparisons"]["learned - random"]["decided"] and len(record["comparisons"]["learned - random"]["z"]) == 3
    # rounds 2 and 3: every row and seed, eval seeds 1 and 2 (round 1 was eval.seed 0)
    assert sorted(study.calls) == sorted((r["name"], s, k) for k in (1, 2) for r in ROWS for s in SEEDS)
    assert study.waves == [len(ROWS) * len(SEEDS)] * 2  # each round's evaluations at once (one wave of Ray tasks)
    res = collect_results(study.config, study.run, study.plans, {r["name"]: ("/vlm", None) for r in ROWS})
    assert res["sequential"]["rounds_run"] == 3
    assert res["rows"]["learned"]["success"]["episodes"] == 3 * EPISODES * len(TASKS) * len(SEEDS)
    assert all(Path(f).is_file() for f in res["rows"]["learned"]["seeds"][1]["round_files"])
    assert res["pairwise"]["learned - random"]["minimum_detectable_difference"]["episodes_per_task"] == [3 * EPISODES] * 2
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps(res))
    assert "Sequential evaluation: 3 of at most 3 rounds of 8 episodes per task (budget)" in study_section_html(folder)
    study.calls.clear()
    assert study.rounds() == record and study.calls == []  # a rerun takes the same decisions and runs nothing


def test_a_clear_difference_stops_early(tmp_path):
    study = Study(tmp_path, {"base": 0.5, "learned": 0.95, "random": 0.2}, rounds=4)
    record = study.rounds()
    assert record["stopped"] == "decided" and record["rounds_run"] < 4
    look = record["comparisons"]["learned - random"]["look"]
    assert look == record["rounds_run"] and abs(record["comparisons"]["learned - random"]["z"][-1]) >= record["boundaries"][look - 1]
    assert len(study.calls) == (record["rounds_run"] - 1) * len(ROWS) * len(SEEDS)
    res = collect_results(study.config, study.run, study.plans, {r["name"]: ("/vlm", None) for r in ROWS})
    assert res["rows"]["random"]["success"]["episodes"] == record["rounds_run"] * EPISODES * len(TASKS) * len(SEEDS)


def test_a_missing_first_round_runs_nothing(tmp_path):
    study = Study(tmp_path, {"base": 0.5, "learned": 0.5, "random": 0.5})
    (study.run.stage_dir("vla_random_s1") / "manifest.json").write_text(json.dumps({"status": "failed"}))
    assert first_round(study.run, study.config, study.plans)[("random", 1)] is None
    assert study.rounds()["stopped"] == "incomplete" and study.calls == [] and not (tmp_path / ROUNDS_DIR).exists()
    assert sequential_record(load_config(StudyConfig, base={"rows": ROWS}), {}, study.run) is None  # rounds: 1


def test_sequential_comparisons_name_two_rows():
    with pytest.raises(ConfigError, match="'learned - nope' is not '<row> - <row>'"):
        load_config(StudyConfig, base={"rows": ROWS, "sequential": {"rounds": 3, "compare": ["learned - nope"]}})
    with pytest.raises(ConfigError, match="needs closed_loop"):
        load_config(StudyConfig, base={"rows": ROWS, "closed_loop": False, "sequential": {"rounds": 2}})
