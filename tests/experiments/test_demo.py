"""End to end: the demo on a reduced world runs every stage and shows the findings that held in every drawn world.

One run of the real pipeline - Meta-World episodes, the synthetic pool, the demo featurizer
(pretrained weights), gap, fit, score, select, export, report - shared by the tests below.

Which findings are asserted comes from ``benchmarks/findings.py`` (docs/findings.md): on 10
worlds drawn by seed, none of them looked at while choosing the demo's defaults, a finding is
asserted here only if it held in all 10 with the featurizer the demo uses. The others are
reported (computed, with a margin whose sign agrees), not asserted.
"""

from __future__ import annotations

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from midtrain.cli import main
from midtrain.experiments.demo import DEMO_SMOLLM2_LAYERS, FINDINGS, DemoConfig
from midtrain.browser import check_report_in_browser
from midtrain.runs import RunDir

pytestmark = pytest.mark.slow  # the whole pipeline end to end (a few minutes)

REDUCED = [
    "tasks=[reach-v3,push-v3,drawer-open-v3,door-open-v3]",
    "episodes_per_task=1",
    "samples_per_source=30",
    "image_size=64",
    "frame_stride=3",
    "sft_steps=2",
    "sft_batch_size=2",
]
# Findings that held in 10 of 10 drawn worlds (python benchmarks/findings.py [--featurizer ...], series 16).
HELD_IN_EVERY_DRAWN_WORLD = {
    "smollm2": set(FINDINGS),  # all five, 10/10
    "minilm": {"cross_group_exceeds_within_group", "embodied_source_highest"},  # the other three: 9/10
}
DEMO_VLM = DemoConfig().demo_vlm


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("demo") / "run"
    if DEMO_VLM == "smollm2":  # the session's build of the same model (seed 0): one GGUF load for all tests
        root.mkdir(parents=True)
        model = request.getfixturevalue("causal_demo_vlm")(DEMO_SMOLLM2_LAYERS)
        os.symlink(model, root / f"demo_model_smollm2_{DEMO_SMOLLM2_LAYERS}layers")
        os.symlink(request.getfixturevalue("causal_demo_vlm")(None), root / "demo_model_smollm2_30layers")
    assert main(["demo", "--run-dir", str(root), *REDUCED]) == 0
    return RunDir(root)


@pytest.fixture(scope="module")
def summary(demo_run):
    return json.loads((demo_run.stage_dir("demo") / "summary.json").read_text())


@pytest.fixture(scope="module")
def findings(summary):
    return summary["findings"]


def test_every_stage_completed_into_one_run_directory(demo_run, summary):
    for stage in ("sim_collect", "sim_pool", "catalog", "featurize", "gap", "fit", "score", "select", "export", "report"):
        assert demo_run.manifest(stage)["status"] == "complete", stage
    catalog_sources = demo_run.manifest("catalog")["sources"]
    assert {s for s, v in catalog_sources.items() if v["kind"] == "vla"} == {"metaworld_objects", "metaworld_articulated"}
    exported = json.loads((demo_run.stage_dir("export") / "mixture.json").read_text())
    selected = pq.read_table(demo_run.stage_dir("select") / "selection.parquet").to_pandas()
    assert len(exported) == int(selected["selected"].sum()) > 0
    diversity = json.loads((demo_run.stage_dir("select") / "selection_metrics.json").read_text())["source_diversity"]
    assert diversity["selected"] == len(exported) and diversity["sources_in_pool"] == 5
    assert summary["featurizer"]["pooling"] == {"minilm": "image_mean", "smollm2": "mean"}[DEMO_VLM]


def test_every_finding_is_reported_with_a_margin_of_the_same_sign(findings):
    for key in FINDINGS:
        margin = findings["margins"][key]
        assert isinstance(findings[key], bool) and margin is not None and math.isfinite(margin), key
        assert findings[key] == (margin > 0), (key, margin)


@pytest.mark.parametrize("finding", sorted(HELD_IN_EVERY_DRAWN_WORLD[DEMO_VLM]))
def test_findings_that_held_in_every_drawn_world(findings, finding):
    assert findings[finding], (finding, findings["margins"][finding], findings["mean_proximity_by_source"])


def test_rerunning_the_demo_recomputes_nothing(demo_run):
    before = {s: demo_run.manifest(s)["timings"]["started"] for s in ("featurize", "gap", "fit", "select")}
    assert main(["demo", "--run-dir", str(demo_run.root), *REDUCED]) == 0
    assert {s: demo_run.manifest(s)["timings"]["started"] for s in before} == before


def test_report_figures_load_in_chromium(demo_run):
    result = check_report_in_browser(demo_run.stage_dir("report") / "report.html")
    assert result["images_total"] >= 8
    assert result["images_ok"] == result["images_total"]


def test_the_demo_mid_trains_its_vlm_on_the_selected_mixture(demo_run, summary):
    """The short LoRA sft of the full-depth demo VLM runs on the exported mixture, and the report shows it."""
    if DEMO_VLM != "smollm2":
        pytest.skip("the MiniLM demo VLM is an encoder: nothing to mid-train")
    manifest = demo_run.manifest("sft")
    assert manifest["status"] == "complete"
    assert manifest["config"]["model"].endswith("demo_model_smollm2_30layers")
    exported = json.loads((demo_run.stage_dir("export") / "mixture.json").read_text())
    mid = summary["mid_training"]
    assert mid["steps"] == 2 and all(math.isfinite(mid[k]) for k in ("train_loss_first", "val_loss_before", "val_loss_after"))
    assert mid["val_loss_after"] != mid["val_loss_before"]  # the adapter changed the model's predictions
    sft_dir = demo_run.stage_dir("sft")
    assert (sft_dir / "adapter" / "adapter_config.json").exists() or any(sft_dir.rglob("adapter_config.json"))
    page = (demo_run.stage_dir("report") / "report.html").read_text()
    section = page.split("<h2>Mid-training (sft)</h2>", 1)[1].split("<h2>", 1)[0]  # the report's section of this stage
    assert "data:image/png;base64," in section and "<td>lora</td>" in section  # its loss curves and its mode
    assert len(exported) > 0
