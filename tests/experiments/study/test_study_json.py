"""study.json and the study page from synthetic episode tables (no simulation, no training): every
paired comparison carries its detectable difference, tasks that tell no row apart and zero-width
intervals are warned about, intervals stay in their quantity's range, the page shows per-task
success and the paired comparisons (learned - random first) and names the final study.json."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midtrain.config import load_config
from midtrain.runs import RunDir
from midtrain.experiments.study.config import StudyConfig
from midtrain.experiments.study.html import comparisons, power_sentence, study_section_html
from midtrain.experiments.study.config import row_stages
from midtrain.experiments.study.results import collect_results

ROWS = [{"name": "base"}, {"name": "learned", "steps": [{"sft": {"data": "selection:proximity"}}]},
        {"name": "random", "steps": [{"sft": {"data": "selection:random"}}]}]  # fmt: skip
# success of episode e of each task, per row and seed: "solved" is 1 everywhere (no information);
# learned beats random on some "varied" episodes; base never succeeds on "varied"
EPISODES = 8
SUCCESS = {
    "base": {0: {"solved": [1] * 8, "varied": [0] * 8}, 1: {"solved": [1] * 8, "varied": [0] * 8}},
    "learned": {0: {"solved": [1] * 8, "varied": [1, 1, 1, 0, 1, 1, 0, 1]}, 1: {"solved": [1] * 8, "varied": [1, 0, 1, 1, 1, 1, 0, 0]}},
    "random": {0: {"solved": [1] * 8, "varied": [1, 0, 1, 0, 0, 1, 0, 0]}, 1: {"solved": [1] * 8, "varied": [0, 0, 1, 1, 0, 1, 0, 0]}},
}
GRIPPER = {"base": [0.2, 0.95], "learned": [0.9, 0.99], "random": [0.5, 0.6]}  # a t-interval over 2 seeds leaves [0, 1]


def _write_run(root: Path) -> tuple[StudyConfig, RunDir, list]:
    config = load_config(StudyConfig, base={"rows": ROWS, "seeds": [0, 1], "cka": {"enabled": False},
                                            "power": {"target_difference": 0.1, "seed_counts": [2, 5]}})  # fmt: skip
    run = RunDir(root)
    plans = [row_stages(r, config.seeds, config.probe.seeds, probe=False) for r in config.rows]
    for row, rs in zip(config.rows, plans):
        for seed, name in rs.finals.items():
            folder = run.stage_dir(name) / "closed_loop" / "step-000010"
            folder.mkdir(parents=True)
            tasks = SUCCESS[row.name][seed]
            table = [{"task": t, "episode": e, "success": bool(v)} for t, vals in tasks.items() for e, v in enumerate(vals)]
            pq.write_table(pa.Table.from_pylist(table), folder / "episodes.parquet")
            manifest = {"status": "complete", "timings": {"wall_s": 1.0},
                        "train": {"eval_l1": 0.1 + 0.01 * seed, "eval_gripper_accuracy": GRIPPER[row.name][seed], "samples": 64}}
            (run.stage_dir(name) / "manifest.json").write_text(json.dumps(manifest))
    return config, run, plans


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    config, run, plans = _write_run(root)
    models = {r.name: ("/vlm", None) for r in config.rows}
    res = collect_results(config, run, plans, models)
    folder = root / ".partial" / "study"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps(res))
    return res, study_section_html(folder, json_path=root / "study" / "study.json"), root


def test_every_paired_comparison_has_its_detectable_difference(study):
    res, _, _ = study
    entries = [res["rows"][n]["vs_baseline"] for n in ("learned", "random")] + list(res["pairwise"].values())
    assert list(res["pairwise"]) == ["learned - random"] and len(entries) == 3
    for d in entries:
        m = d["minimum_detectable_difference"]
        assert m["power"] == 0.8 and m["alpha"] == 0.05 and m["target_difference"] == 0.1
        assert m["seeds"] == 2 and m["episodes_per_task"] == [EPISODES, EPISODES]
        assert 0 < m["value"] <= 1 and m["value"] >= 2.8 * m["standard_error"] - 1e-3
        assert [x["seeds"] for x in m["to_reach_target"]] == [2, 5]
    m = res["pairwise"]["learned - random"]["minimum_detectable_difference"]
    # the "solved" task's differences are all 0: its components are 0, the "varied" task carries all
    assert m["variance_components"]["episode"][0] == 0 and m["variance_components"]["residual"][0] == 0
    assert m["variance_components"]["residual"][1] > 0
    # 16 episodes per row cannot resolve 0.1; more seeds and episodes can, and say how many
    assert m["value"] > 0.1 and m["cheapest_for_target"]["episodes_per_row"] > 2 * 2 * EPISODES


def test_warnings_name_tasks_without_information_and_zero_width_intervals(study):
    res, page, _ = study
    saturated = [w for w in res["warnings"] if w["kind"] == "saturated_task"]
    assert [(w["subject"], w["value"]) for w in saturated] == [("solved", 1.0)]
    zero = [w for w in res["warnings"] if w["kind"] == "zero_width_interval"]
    assert len(zero) == 1  # one warning naming every zero-width interval
    zero = set(zero[0]["subjects"])
    assert res["rows"]["base"]["success"]["ci95"] == [0.5, 0.5] and "base: success" in zero  # 1 on solved, 0 on varied
    assert "learned: success" not in zero
    assert "task solved: success 1 in every row" in page and "zero-width 95% intervals (base: success)" in page


def test_intervals_stay_in_their_range_and_few_seeds_are_shown(study):
    res, page, _ = study
    for row in res["rows"].values():
        g = row["offline_gripper_accuracy"]
        assert 0.0 <= g["ci95"][0] <= g["mean"] <= g["ci95"][1] <= 1.0 and len(g["values"]) == 2
    assert res["rows"]["base"]["offline_gripper_accuracy"]["clipped"]
    assert "0.57 (seeds 0.20, 0.95)" in page  # 2 seeds: the seeds, not a 1-degree-of-freedom interval


def test_the_page_shows_tasks_comparisons_and_the_final_json(study):
    res, page, root = study
    header = page[page.index("<table>") : page.index("</tr>")]
    assert "<th>solved</th>" in header and "<th>varied</th>" in header
    pairs = page[page.index('<table class="pairs">') :]
    order = [pairs.index(k) for k in ("learned - random", "learned - base", "random - base")]
    assert order == sorted(order)  # the headline comparison first
    assert [k for k, _ in comparisons(res)] == ["learned - random", "learned - base", "random - base"]
    mdd = round(100 * res["pairwise"]["learned - random"]["minimum_detectable_difference"]["value"])
    assert f"this study can detect differences of {mdd} points or more between learned and random" in page
    assert str(root / "study" / "study.json") in page and ".partial" not in page


def test_a_comparison_that_resolves_nothing_says_so():
    m = {"value": 1.3, "power": 0.8, "alpha": 0.05, "seeds": 1, "episodes_per_task": [2], "target_difference": 0.1,
         "cheapest_for_target": None}
    text = power_sentence("learned - random", {"minimum_detectable_difference": m})
    assert text == ("With 1 seed x 2 episodes per task, this study cannot detect any difference between learned and "
                    "random (80% power, two-sided 5%); 10 points is out of reach of the seed counts tried.")
