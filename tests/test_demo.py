"""End to end: the demo on a reduced world shows what the EmbodiedMidtrain paper found.

One run (about a minute on 2 idle cores) of the real pipeline - Meta-World episodes, the
synthetic pool, the pretrained-weights demo featurizer, gap, fit, score, select, export,
report - shared by the assertions below.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from midtrain.cli import main
from midtrain.report.browser import check_report_in_browser
from midtrain.runs import RunDir

pytestmark = pytest.mark.slow  # the whole pipeline end to end (about a minute)

REDUCED = [
    "tasks=[reach-v3,push-v3,drawer-open-v3,door-open-v3]",
    "episodes_per_task=1",
    "samples_per_source=30",
    "image_size=64",
    "frame_stride=3",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--run-dir", str(root), *REDUCED]) == 0
    return RunDir(root)


@pytest.fixture(scope="module")
def findings(demo_run):
    return json.loads((demo_run.stage_dir("demo") / "summary.json").read_text())["findings"]


def test_every_stage_completed_into_one_run_directory(demo_run):
    for stage in ("sim_collect", "sim_pool", "catalog", "featurize", "gap", "fit", "score", "select", "export", "report"):
        assert demo_run.manifest(stage)["status"] == "complete", stage
    catalog_sources = demo_run.manifest("catalog")["sources"]
    assert {s for s, v in catalog_sources.items() if v["kind"] == "vla"} == {"metaworld_objects", "metaworld_articulated"}
    exported = json.loads((demo_run.stage_dir("export") / "mixture.json").read_text())
    selected = pq.read_table(demo_run.stage_dir("select") / "selection.parquet").to_pandas()
    assert len(exported) == int(selected["selected"].sum()) > 0


def test_vla_sources_are_closer_to_each_other_than_to_the_pool(findings):
    assert findings["mean_mmd_within_vla"] < findings["mean_mmd_cross"]
    assert findings["cross_group_exceeds_within_group"]


def test_embodied_source_scores_highest(findings):
    assert findings["highest_scoring_source"] == "spatial_pointing", findings["mean_proximity_by_source"]


def test_text_centric_source_is_farthest_from_the_robot_data(findings):
    assert findings["farthest_vlm_source_by_mmd"] == "book_covers"


def test_text_centric_source_scores_lowest(findings):
    assert findings["lowest_scoring_source"] == "book_covers", findings["mean_proximity_by_source"]


def test_selection_is_closer_to_the_robot_data_than_random(findings):
    assert findings["mmd_selection_vla"] < findings["mmd_random_vla"]


def test_rerunning_the_demo_recomputes_nothing(demo_run):
    before = {s: demo_run.manifest(s)["timings"]["started"] for s in ("featurize", "gap", "fit", "select")}
    assert main(["demo", "--run-dir", str(demo_run.root), *REDUCED]) == 0
    assert {s: demo_run.manifest(s)["timings"]["started"] for s in before} == before


def test_report_figures_load_in_chromium(demo_run):
    result = check_report_in_browser(demo_run.stage_dir("report") / "report.html")
    assert result["images_total"] >= 8
    assert result["images_ok"] == result["images_total"]
