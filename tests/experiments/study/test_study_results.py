"""The study's aggregation on a synthetic run directory (no training): ``study.json`` from the
sub-stages' manifests, closed-loop ``episodes.parquet`` and selection metrics, then the figures and
the page. The expected numbers are computed here by hand from the successes written."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midtrain.config import StageConfig, load_config
from midtrain.experiments.study.config import StudyConfig, row_stages
from midtrain.experiments.study.html import study_page_html, write_figures
from midtrain.experiments.study.results import closed_loop_episodes, collect_results
from midtrain.runs import RunDir, stage_run

ROWS = [{"name": "base"}, {"name": "learned", "steps": [{"sft": {"data": "selection:proximity"}}]}]
# row -> seed -> step -> task -> successes of episodes 0..3
SUCCESS = {
    "base": {0: {5: {"reach": [0, 0, 0, 1], "push": [0, 0, 0, 0]}, 10: {"reach": [1, 0, 0, 1], "push": [0, 0, 1, 0]}},
             1: {5: {"reach": [0, 1, 0, 0], "push": [0, 0, 0, 0]}, 10: {"reach": [1, 1, 0, 0], "push": [0, 0, 0, 0]}}},
    "learned": {0: {5: {"reach": [1, 0, 0, 1], "push": [0, 1, 0, 0]}, 10: {"reach": [1, 1, 1, 1], "push": [0, 1, 1, 0]}},
                1: {5: {"reach": [1, 1, 0, 0], "push": [0, 0, 0, 1]}, 10: {"reach": [1, 1, 0, 1], "push": [1, 0, 1, 0]}}},
}  # fmt: skip


def _mean(tasks: dict) -> float:
    return float(np.mean([np.mean(v) for v in tasks.values()]))


@pytest.fixture
def study_run(tmp_path):
    config = load_config(StudyConfig, base={
        "rows": ROWS, "seeds": [0, 1], "vla": {"policy": {"chunk_size": 4}, "train": {"steps": 10}},
        "midtrain": {"train": {"steps": 5}}, "probe": {"enabled": False}, "cka": {"enabled": False}})  # fmt: skip
    run = RunDir(tmp_path / "run")
    plans = [row_stages(r, config.seeds, config.probe.seeds, config.probe.enabled) for r in config.rows]
    with stage_run(run, "sft_learned", StageConfig()) as st:
        st.extra["train"] = {"samples": 40, "steps": 5, "train_loss": 1.5, "eval_loss": 1.7}
    select = run.root / "selections" / "proximity" / "select"
    select.mkdir(parents=True)
    (select / "selection_metrics.json").write_text(json.dumps({"selected": 20, "mmd_selection_vla": 0.12, "mmd_random_vla": 0.3}))
    for row, rs in zip(config.rows, plans):
        for seed, name in rs.finals.items():
            with stage_run(run, name, StageConfig()) as st:
                st.extra["train"] = {"samples": 320, "eval_l1": 0.1 + 0.05 * seed, "eval_gripper_accuracy": 0.9}
                for step, tasks in SUCCESS[row.name][seed].items():
                    folder = st.dir / "closed_loop" / f"step-{step:06d}"
                    folder.mkdir(parents=True)
                    rows = [{"task": t, "episode": e, "success": bool(s)} for t, v in tasks.items() for e, s in enumerate(v)]
                    pq.write_table(pa.Table.from_pylist(rows[::-1]), folder / "episodes.parquet")  # any row order
    models = {"base": ("vlm/model", None), "learned": (str(run.stage_dir("sft_learned") / "model"), None)}
    return config, run, plans, models


def test_closed_loop_episodes_per_step_and_task(study_run):
    _, run, _, _ = study_run
    eps = closed_loop_episodes(run.stage_dir("vla_learned_s1"))
    assert sorted(eps) == [5, 10]
    assert eps[10] == {t: [bool(s) for s in v] for t, v in SUCCESS["learned"][1][10].items()}


def test_study_json_numbers_come_from_the_artefacts(study_run):
    config, run, plans, models = study_run
    res = collect_results(config, run, plans, models)
    base, learned = res["rows"]["base"], res["rows"]["learned"]
    for name, row in (("base", base), ("learned", learned)):
        for seed in (0, 1):
            assert row["seeds"][seed]["success"] == pytest.approx(_mean(SUCCESS[name][seed][10]), abs=1e-4)
            assert [c["step"] for c in row["seeds"][seed]["curve"]] == [5, 10]
        expected = np.mean([_mean(SUCCESS[name][s][10]) for s in (0, 1)])
        assert row["success"]["mean"] == pytest.approx(expected, abs=1e-4)
        assert row["success"]["episodes"] == 16
        assert [c["step"] for c in row["curve"]] == [5, 10]
    assert learned["vs_baseline"]["mean"] == pytest.approx(learned["success"]["mean"] - base["success"]["mean"], abs=1e-4)
    lo, hi = learned["vs_baseline"]["ci95"]
    assert lo <= learned["vs_baseline"]["mean"] <= hi
    assert base["vs_baseline"] is None and res["pairwise"] == {}  # only the baseline besides learned
    assert learned["offline_l1"]["mean"] == pytest.approx(0.125) and learned["offline_l1"]["n"] == 2
    assert learned["mixture"]["mmd_to_vla"] == 0.12 and learned["mixture"]["selected"] == 20
    assert learned["steps"][0]["samples_seen"] == 40 and base["mixture"] is None
    assert res["budgets"]["midtrain_samples"] == {"learned": 40} and res["budgets"]["vla_equal"]


def test_figures_and_page_show_every_row(study_run, tmp_path):
    config, run, plans, models = study_run
    res = collect_results(config, run, plans, models)
    out = tmp_path / "study"
    out.mkdir()
    res["figures"] = write_figures(res, out)
    assert res["figures"] and all((out / f).read_bytes()[:4] == b"\x89PNG" for f in res["figures"].values())
    (out / "study.json").write_text(json.dumps(res))
    page = study_page_html(out)
    assert page.count('<td class="text">learned</td>') == 1 and page.count('<tr class="baseline">') == 1
    assert f"{learned_mean(res):.2f}" in page and "0.120" in page  # the learned row's success and its mixture's MMD
    assert page.count("data:image/png;base64,") == len(res["figures"])


def learned_mean(res: dict) -> float:
    return res["rows"]["learned"]["success"]["mean"]
