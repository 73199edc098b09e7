"""The study on an executor: its sub-stages in waves (every row's step, then every row x seed VLA and
probe), a sub-stage whose worker died left out with its row's later stages and reported under
``missing``, and a Ray address that does not answer refused before any work. The executor here is
a stand-in that records the waves (the real Ray run is the slow smoke test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midtrain.config import load_config
from midtrain.experiments.executors import Outcome
from midtrain.experiments.study.config import StudyConfig, row_stages
from midtrain.experiments.study.stage import StudyContext, _final_calls, _missing, _probe_calls, _run_rows, run_study
from midtrain.runs import RunDir, StageError

ROWS = [
    {"name": "base"},
    {"name": "learned", "steps": [{"sft": {"data": "selection:proximity"}}]},
    {"name": "random", "steps": [{"sft": {"data": "selection:random"}}]},
    {"name": "staged", "steps": [{"sft": {"data": "selection:random"}}, {"vla": {"data": "robot"}}]},
    {"name": "scratch", "init": "random_weights"},
]


def study(**extra) -> StudyConfig:
    base = {"rows": ROWS, "vla": {"policy": {"chunk_size": 4}, "data": {"frame_stride": 2}, "train": {"steps": 3}},
            "midtrain": {"train": {"steps": 2}}, "seeds": [0, 1], "probe": {"seeds": 1}}  # fmt: skip
    return load_config(StudyConfig, base={**base, **extra})


class WaveRecorder:
    """Records each wave's labels; "runs" a call by writing its complete manifest, except the calls
    in ``dies``, whose worker died."""

    name = "recorder"

    def __init__(self, run: RunDir, dies: set[str]):
        self.run_dir, self.dies, self.waves = run, dies, []

    def check(self, requests):
        pass

    def resources(self, call):
        return None

    def run(self, calls):
        self.waves.append([c.label for c in calls])
        out = []
        for c in calls:
            if c.label in self.dies:
                out.append(Outcome(c.label, error="WorkerCrashedError: the worker died unexpectedly"))
                continue
            folder = self.run_dir.stage_dir(c.label)
            folder.mkdir(parents=True)
            (folder / "manifest.json").write_text(json.dumps({"status": "complete"}))
            out.append(Outcome(c.label, folder))
        return out

    def close(self):
        pass


def test_sub_stages_run_in_waves_and_a_dead_worker_leaves_its_row_missing(tmp_path):
    config, run = study(), RunDir(tmp_path / "run")
    executor = WaveRecorder(run, dies={"sft_learned", "vla_random_s1"})
    ctx = StudyContext(config, run, executor)
    ctx.base_vlm, ctx.random_vlm = "/vlm", "/vlm_random"
    ctx._selections = {s: (Path(f"/sel/{s}/mixture.parquet"), Path(f"/sel/{s}/m.json")) for s in ("proximity", "random")}
    plans = [row_stages(r, config.seeds, config.probe.seeds) for r in config.rows]

    models = _run_rows(ctx, plans)
    assert executor.waves == [["sft_learned", "sft_random", "sft_staged_1"], ["vla_staged_2"]]
    assert set(models) == {"base", "random", "staged", "scratch"}  # learned's mid-training did not finish
    assert models["staged"] == (str(run.stage_dir("vla_staged_2") / "policy" / "backbone"), str(run.stage_dir("vla_staged_2") / "policy"))
    assert models["scratch"] == ("/vlm_random", None)

    ctx.runner.run_wave(_final_calls(ctx, plans, models) + _probe_calls(ctx, plans, models))
    finals = [f"vla_{r}_s{s}" for s in (0, 1) for r in ("base", "random", "staged", "scratch")]
    assert executor.waves[-1] == finals + [f"probe_{r}_s0" for r in ("base", "random", "staged", "scratch")]

    missing = _missing(ctx, plans)
    assert missing == {"sft_learned": "WorkerCrashedError: the worker died unexpectedly",
                       "vla_learned_s0": "not run: sft_learned did not finish",
                       "vla_learned_s1": "not run: sft_learned did not finish",
                       "probe_learned_s0": "not run: sft_learned did not finish",
                       "vla_random_s1": "WorkerCrashedError: the worker died unexpectedly"}  # fmt: skip
    assert {f["stage"] for f in ctx.runner.failures} == {"sft_learned", "vla_random_s1"}


def test_an_address_that_does_not_answer_stops_the_study_before_any_work(tmp_path):
    pytest.importorskip("ray")
    config = study(backend="ray", ray={"address": "127.0.0.1:1"})
    with pytest.raises(StageError, match=r"^ray\.address: no Ray cluster answers at '127\.0\.0\.1:1'"):
        run_study(config, RunDir(tmp_path / "run"))
    assert list((tmp_path / "run").iterdir()) == []


def test_the_backend_is_a_throughput_setting():
    from midtrain.config import output_settings

    local, ray = study(), study(backend="ray", ray={"address": "auto", "gpus_per_stage": 1})
    assert "backend" not in output_settings(ray) and output_settings(local) == output_settings(ray)  # a local run directory continues on a cluster
