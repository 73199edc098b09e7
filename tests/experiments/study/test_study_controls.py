"""The study's controls (``blind``, ``vision_tower``) on a synthetic run directory (no training): a
control row resolves to the common VLA recipe plus its policy setting, study.json reports it like a
row and under ``controls`` (baseline - control, paired, with its detectable difference), the page
says what each control measures in one sentence, and calibration names the tasks to drop."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midtrain.config import ConfigError, StageConfig, load_config
from midtrain.experiments.study.calibration import calibration_config, calibration_record
from midtrain.experiments.study.config import StudyConfig, row_stages, vla_config
from midtrain.experiments.study.html import study_page_html
from midtrain.experiments.study.results import collect_results
from midtrain.experiments.study.stage import StudyContext, vla_mapping
from midtrain.experiments.runner import deep_merge
from midtrain.runs import RunDir, stage_run

ROWS = [{"name": "base"}, {"name": "learned", "steps": [{"sft": {"data": "selection:proximity"}}]},
        {"name": "blind", "control": "blind"}, {"name": "vision_tower", "control": "vision_tower"}]  # fmt: skip
# row -> seed -> task -> successes of episodes 0..3 (push: every row at 0; door: base and blind at 1, vision_tower not)
SUCCESS = {
    "base": {0: {"reach": [1, 1, 0, 1], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]},
             1: {"reach": [1, 0, 1, 1], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]}},
    "learned": {0: {"reach": [1, 1, 1, 1], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]},
                1: {"reach": [1, 1, 0, 1], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]}},
    "blind": {0: {"reach": [0, 0, 0, 1], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]},
              1: {"reach": [0, 1, 0, 0], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]}},
    "vision_tower": {0: {"reach": [1, 1, 1, 1], "push": [0, 0, 0, 0], "door": [1, 0, 1, 1]},
                     1: {"reach": [1, 1, 1, 0], "push": [0, 0, 0, 0], "door": [1, 1, 1, 1]}},
}  # fmt: skip


def study(rows=ROWS, **extra) -> StudyConfig:
    base = {"rows": rows, "seeds": [0, 1], "vla": {"policy": {"chunk_size": 4}, "train": {"steps": 10}},
            "midtrain": {"train": {"steps": 5}}, "power": {"target_difference": 0.2, "seed_counts": [2, 4]}}  # fmt: skip
    return load_config(StudyConfig, base={**base, **extra})


def _mean(tasks: dict) -> float:
    return float(np.mean([np.mean(v) for v in tasks.values()]))


@pytest.fixture
def results(tmp_path):
    config = study(probe={"enabled": False}, cka={"enabled": False})
    run = RunDir(tmp_path / "run")
    plans = [row_stages(r, config.seeds, config.probe.seeds, config.probe.enabled) for r in config.rows]
    for row, rs in zip(config.rows, plans):
        for seed, name in rs.finals.items():
            with stage_run(run, name, StageConfig()) as st:
                folder = st.dir / "closed_loop" / "step-000010"
                folder.mkdir(parents=True)
                eps = [{"task": t, "episode": e, "success": bool(s)} for t, v in SUCCESS[row.name][seed].items() for e, s in enumerate(v)]
                pq.write_table(pa.Table.from_pylist(eps), folder / "episodes.parquet")
    models = {r.name: ("vlm/model", None) for r in config.rows}
    return config, collect_results(config, run, plans, models)


def test_a_control_row_is_the_common_recipe_with_its_policy_setting(tmp_path):
    cfg = study()
    rows = {r.name: r for r in cfg.rows}
    assert rows["blind"].vla == {"policy": {"blank_images": True}}
    assert rows["vision_tower"].vla == {"policy": {"features": "vision_tower"}}
    ctx = StudyContext(cfg, RunDir(tmp_path / "run"))
    for name, key, value in (("blind", "blank_images", True), ("vision_tower", "features", "vision_tower"), ("base", "features", "vlm")):
        mapping = vla_mapping(ctx, deep_merge(cfg.vla, rows[name].vla), f"vla_{name}_s0", 0, "/m", None, closed_loop=True)
        assert getattr(vla_config(mapping, {}, name).policy, key) == value
        assert mapping["policy"]["chunk_size"] == 4 and mapping["closed_loop"] == vla_mapping(
            ctx, cfg.vla, "x", 0, "/m", None, closed_loop=True)["closed_loop"]  # the same protocol as every row  # fmt: skip
    assert load_config(StudyConfig, base=cfg.to_dict()).rows[2].vla == rows["blind"].vla  # resolving twice is resolving once
    plans = {r.name: row_stages(r, cfg.seeds, cfg.probe.seeds) for r in cfg.rows}
    assert plans["blind"].finals == {0: "vla_blind_s0", 1: "vla_blind_s1"} and plans["blind"].probes == {}
    assert plans["base"].probes  # the baseline's probe measures the VLM the controls share


def test_control_rows_that_are_not_controls_fail_naming_the_row():
    with pytest.raises(ConfigError, match="blind.*no steps"):
        study([{"name": "base"}, {"name": "blind", "control": "blind", "steps": [{"sft": {"data": "selection:random"}}]}])
    with pytest.raises(ConfigError, match="blind.*no steps"):
        study([{"name": "base"}, {"name": "blind", "control": "blind", "init": "random_weights"}])
    with pytest.raises(ConfigError, match="baseline_row.*control"):
        study([{"name": "base", "control": "blind"}])
    with pytest.raises(ConfigError, match="control"):
        study([{"name": "base"}, {"name": "deaf", "control": "deaf"}])


def test_study_json_reports_the_controls_paired_with_the_baseline(results):
    config, res = results
    rows = res["rows"]
    assert rows["blind"]["control"] == "blind" and rows["base"]["control"] is None
    base_mean = np.mean([_mean(SUCCESS["base"][s]) for s in (0, 1)])
    assert set(res["controls"]) == {"base - blind", "base - vision_tower"}
    for control, measures in (("blind", "vision"), ("vision_tower", "language_model")):
        d = res["controls"][f"base - {control}"]
        expected = base_mean - np.mean([_mean(SUCCESS[control][s]) for s in (0, 1)])
        assert d["mean"] == pytest.approx(expected, abs=1e-4) and d["measures"] == measures and d["control"] == control
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        mdd = d["minimum_detectable_difference"]
        assert 0 < mdd["value"] <= 1 and mdd["seeds"] == 2 and mdd["episodes_per_task"] == [4, 4, 4]
    assert res["controls"]["base - blind"]["mean"] == pytest.approx(-rows["blind"]["vs_baseline"]["mean"], abs=1e-4)
    assert set(res["pairwise"]) == set()  # learned is the only compared row besides the baseline; controls are apart
    assert [w["subject"] for w in res["warnings"] if w["kind"] == "saturated_task"] == ["push"]


def test_the_page_says_what_each_control_measures(results, tmp_path):
    _, res = results
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps(res))
    page = study_page_html(out)
    blind = res["controls"]["base - blind"]
    assert f"How much success comes from vision: base - blind = {blind['mean']:+.2f}" in page
    assert "What the language model adds: base - vision_tower" in page
    assert "study VLM, control: blind" in page


def test_calibration_drops_the_tasks_where_base_and_controls_agree_at_0_or_1(results):
    config, res = results
    record = calibration_record(res)
    assert record["rows"] == ["base", "blind", "vision_tower"]
    assert record["drop"] == [{"task": "push", "value": 0.0}]  # door: vision_tower below 1, so it can still tell rows apart
    assert record["keep"] == ["reach", "door"]
    assert set(record["controls"]) == {"base - blind", "base - vision_tower"}
    without_vt = {**res, "rows": {k: v for k, v in res["rows"].items() if k != "vision_tower"}}
    assert [d["task"] for d in calibration_record(without_vt)["drop"]] == ["push", "door"]


def test_calibration_runs_the_baseline_and_the_controls_only():
    cfg = study(sequential={"rounds": 3, "compare": ["learned - base"]})
    reduced = calibration_config(cfg)
    assert [r.name for r in reduced.rows] == ["base", "blind", "vision_tower"]
    assert not reduced.probe.enabled and not reduced.cka.enabled and reduced.sequential.rounds == 1 and not reduced.report
    assert reduced.vla == cfg.vla and reduced.eval == cfg.eval and reduced.seeds == cfg.seeds
