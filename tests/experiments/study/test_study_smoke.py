"""``midtrain study`` end to end on configs/study_smoke.yaml (every row of the default study at tiny
budgets): mechanics, not findings. One study, killed once part-way and rerun, shared by the
assertions: every cell filled, intervals computed, files written, and nothing finished recomputed."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import midtrain
from midtrain.cli import main
from midtrain.experiments.study.stage import study_findings
from midtrain.runs import RunDir

pytestmark = pytest.mark.slow  # the whole study, twice (a few minutes)

ROOT = Path(__file__).resolve().parents[3]
SMOKE = ROOT / "configs" / "study_smoke.yaml"
DEFAULT = ROOT / "configs" / "study.yaml"
SRC = str(Path(midtrain.__file__).parents[1])
KILL_AFTER = "vla_base_s0"  # a stage that completes part-way through the study


def _started(run: RunDir, stages: list[str]) -> dict[str, str]:
    return {s: run.manifest(s)["timings"]["started"] for s in stages if run.manifest(s)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "MIDTRAIN_PROGRESS": "off"}
    proc = subprocess.Popen([sys.executable, "-m", "midtrain.cli", "study", "--config", str(SMOKE), "--run-dir", str(root)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        man = root / KILL_AFTER / "manifest.json"
        if man.is_file() and json.loads(man.read_text()).get("status") == "complete":
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the study ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = RunDir(root)
    done_before = [p.name for p in root.iterdir() if p.is_dir() and (p / "manifest.json").is_file()
                   and run.manifest(p.name)["status"] == "complete"]  # fmt: skip
    before = _started(run, done_before)
    assert not (root / "study").exists()
    assert main(["study", "--config", str(SMOKE), "--run-dir", str(root)]) == 0
    return {"run": run, "before": before, "json": json.loads((root / "study" / "study.json").read_text())}


def test_the_smoke_study_has_every_row_of_the_default():
    default, smoke = yaml.safe_load(DEFAULT.read_text()), yaml.safe_load(SMOKE.read_text())
    assert smoke["rows"] == default["rows"]
    assert smoke["baseline_row"] == default["baseline_row"] if "baseline_row" in default else "baseline_row" not in smoke


def test_a_killed_study_continues_without_redoing_finished_stages(study):
    run, before = study["run"], study["before"]
    assert "sim_collect" in before and KILL_AFTER in before
    assert _started(run, list(before)) == before


def test_every_cell_is_filled_with_intervals(study):
    res = study["json"]
    rows = res["rows"]
    assert list(rows) == ["base", "learned", "random", "mean_distance", "scratch", "blind", "vision_tower"]
    for name, r in rows.items():
        assert set(r["seeds"]) == {"0", "1"}
        for seed, s in r["seeds"].items():
            assert s["status"] == "complete" and s["stage"] == f"vla_{name}_s{seed}"
            assert 0.0 <= s["success"] <= 1.0 and set(s["per_task"]) == {"reach-v3", "drawer-open-v3"}
            assert [p["step"] for p in s["curve"]] == [1, 2]
            assert s["offline"]["l1"] is not None and s["samples_seen"] == 4
            assert Path(s["episodes_file"]).is_file()
        succ = r["success"]
        assert succ["episodes"] == 2 * 2 * 2 and succ["ci95"][0] <= succ["mean"] <= succ["ci95"][1]
        assert len(succ["per_seed"]) == 2 and r["offline_l1"]["n"] == 2 and len(r["offline_l1"]["ci95"]) == 2
        assert [p["step"] for p in r["curve"]] == [1, 2]
        assert (r["probe"]["seeds"]["0"]["l1"] is not None) if not r["control"] else r["probe"]["seeds"] == {}
        assert len(r["cka"]["vlm"]) == res["cka"]["layers"] and len(r["cka"]["vla"]["0"]) == res["cka"]["layers"]
        if name == "base":
            assert r["vs_baseline"] is None and r["cka"]["vlm"] == [1.0] * res["cka"]["layers"] and r["mixture"] is None
        else:
            d = r["vs_baseline"]
            assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
            _check_power(d["minimum_detectable_difference"])
    for name, scorer in (("learned", "proximity"), ("random", "random"), ("mean_distance", "mean_distance")):
        mix = rows[name]["mixture"]
        assert mix["scorer"] == scorer and mix["mmd_to_vla"] is not None and mix["diversity"] is not None
        assert rows[name]["steps"][0]["samples_seen"] == 4  # the same mid-training budget for every row
    assert rows["scratch"]["init"] == "random_weights" and rows["scratch"]["cka"]["vlm"][0] < 0.999
    assert res["budgets"]["midtrain_equal"] and res["budgets"]["vla_equal"]
    assert res["cost"]["total_wall_s"] > 0
    assert rows["blind"]["control"] == "blind" and rows["vision_tower"]["control"] == "vision_tower"
    assert rows["blind"]["recipe_overrides"] == {"policy": {"blank_images": True}}
    assert list(res["controls"]) == ["base - blind", "base - vision_tower"]  # what vision, what the language model adds
    for key, d in res["controls"].items():
        control = key.split(" - ")[1]
        assert d["measures"] == {"blind": "vision", "vision_tower": "language_model"}[control]
        assert d["mean"] == pytest.approx(rows["base"]["success"]["mean"] - rows[control]["success"]["mean"], abs=1e-3)
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        _check_power(d["minimum_detectable_difference"])
    for control in ("blind", "vision_tower"):  # the policy directory says so, so closed-loop evaluation sees the same input
        saved = json.loads((study["run"].stage_dir(f"vla_{control}_s0") / "policy" / "config.json").read_text())["settings"]
        assert (saved["blank_images"], saved["features"]) == {"blind": (True, "vlm"), "vision_tower": (False, "vision_tower")}[control]
    others = ["learned", "random", "mean_distance", "scratch"]  # every pair without the baseline, in row order
    assert list(res["pairwise"]) == [f"{a} - {b}" for i, a in enumerate(others) for b in others[i + 1 :]]
    for key, d in res["pairwise"].items():
        a, b = key.split(" - ")
        assert d["mean"] == pytest.approx(rows[a]["success"]["mean"] - rows[b]["success"]["mean"], abs=1e-3)
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        _check_power(d["minimum_detectable_difference"])
    # warnings: every task at 0 (or 1) in every row is named, and nothing else is called saturated
    per_task = {t: {r["success"]["per_task"][t] for r in rows.values()} for t in ("reach-v3", "drawer-open-v3")}
    flat = {t for t, values in per_task.items() if values in ({0.0}, {1.0})}
    assert {w["subject"] for w in res["warnings"] if w["kind"] == "saturated_task"} == flat
    assert all(w["message"] for w in res["warnings"])
    zero = {f"{name}: success" for name, r in rows.items() if r["success"]["ci95"][0] == r["success"]["ci95"][1]}
    warned = [w["subjects"] for w in res["warnings"] if w["kind"] == "zero_width_interval"]
    assert zero == ({s for s in warned[0] if s.endswith(": success")} if warned else set())


def _check_power(m: dict) -> None:
    """The detectable difference of a comparison in the smoke study's layout (2 seeds x 2 tasks x 2 episodes)."""
    assert m["seeds"] == 2 and m["episodes_per_task"] == [2, 2] and m["target_difference"] == 0.2
    assert 0 < m["value"] and m["value"] >= 2.8 * m["standard_error"] - 1e-3
    assert [d["seeds"] for d in m["to_reach_target"]] == [2, 4]
    for d in m["to_reach_target"]:
        assert d["episodes_per_task"] is None or d["episodes_per_row"] == d["seeds"] * d["episodes_per_task"] * 2


def test_files_are_written_and_figures_decode(study):
    from PIL import Image

    from midtrain.experiments.study.html import study_section_html

    folder = study["run"].stage_dir("study")
    assert set(study["json"]["figures"]) == {"success", "curves", "cka"}
    for name in study["json"]["figures"].values():
        with Image.open(folder / name) as im:
            assert im.size[0] > 100
    section = study_section_html(folder)
    assert section[: section.index("</table>")].count("<tr") == 1 + 7 and section.count("data:image/png;base64,") == 3
    assert section.count("this study can") == 6 + 6  # "can detect" or "cannot detect": the pairs, then each row vs the base
    assert "How much success comes from vision: base - blind" in section and "What the language model adds" in section
    page = (folder / "study.html").read_text()
    assert page.count("<section") == 1 and str(folder / "study.json") in page and ".partial" not in page
    assert (study["run"].stage_dir("report") / "report.html").is_file()  # the study writes the run report


def test_rerunning_the_study_recomputes_nothing(study):
    run = study["run"]
    stages = [p.name for p in run.root.iterdir() if (p / "manifest.json").is_file()]
    before = _started(run, stages)
    buf = io.StringIO()
    assert main(["study", "--config", str(SMOKE), "--run-dir", str(run.root)]) == 0, buf.getvalue()
    assert _started(run, stages) == before


def test_the_run_report_has_the_study_section(study):
    """`midtrain report` on a study's run directory shows the study's table and figures."""
    run = study["run"]
    assert main(["report", "--run-dir", str(run.root)]) == 0
    page = (run.stage_dir("report") / "report.html").read_text()
    start = page.index("Does mid-training make a better VLA?")
    section = page[start : page.index("</section>", start)]
    assert section[: section.index("</table>")].count("<tr") == 1 + 7 and section.count("data:image/png;base64,") == 3


def test_calibration_reuses_the_baseline_and_the_controls(study):
    """``calibrate=true`` on the finished study: only the aggregate runs (the baseline's and the controls'
    VLAs are the study's), into calibration/ beside study/."""
    run = study["run"]
    stages = [p.name for p in run.root.iterdir() if (p / "manifest.json").is_file()]
    before = _started(run, stages)
    assert main(["study", "--config", str(SMOKE), "--run-dir", str(run.root), "calibrate=true"]) == 0
    assert _started(run, stages) == before
    record = json.loads((run.stage_dir("calibration") / "calibration.json").read_text())
    assert record["rows"] == ["base", "blind", "vision_tower"] and list(record["controls"]) == ["base - blind", "base - vision_tower"]
    assert sorted(record["keep"] + [d["task"] for d in record["drop"]]) == ["drawer-open-v3", "reach-v3"]
    for d in record["drop"]:
        assert {record["per_task"][r][d["task"]] for r in record["rows"]} == {d["value"]}
    assert json.loads((run.stage_dir("study") / "study.json").read_text())["rows"].keys() == study["json"]["rows"].keys()


def test_the_ray_backend_computes_the_same_study(study):
    """Last in this module (it recomputes the rows): every row sub-stage deleted, as if a driver died
    after the world, then rerun with backend=ray on a local 2-CPU Ray cluster. The rerun schedules
    only what is missing (the world is not recomputed), the sub-stages run in Ray workers, and
    study.json is the local backend's: every success, interval, curve, probe and CKA value."""
    pytest.importorskip("ray")
    run, root = study["run"], study["run"].root
    local = json.loads((root / "study" / "study.json").read_text())
    redo = [p.name for p in root.iterdir() if p.name.startswith(("sft_", "vla_", "probe_")) or p.name in ("cka", "study", "report")]
    kept = [p.name for p in root.iterdir() if (p / "manifest.json").is_file() and p.name not in redo]
    assert len(redo) == 3 + 7 * 2 + 5 + 3 and "sim_collect" in kept  # 5 rows + 2 controls x 2 seeds; controls get no probe
    before = _started(run, kept)
    for name in redo:
        shutil.rmtree(root / name)
    assert main(["study", "--config", str(SMOKE), "--run-dir", str(root), "backend=ray", "ray.num_cpus=2"]) == 0
    assert _started(run, kept) == before  # the world and the selections: not recomputed
    workers = {json.loads((root / ".locks" / f"{name}.lock").read_text())["pid"] for name in redo if name.startswith("vla_")}
    assert os.getpid() not in workers  # trained in Ray worker processes, not in the driver
    distributed = json.loads((root / "study" / "study.json").read_text())
    assert distributed["missing"] == [] and distributed["config"]["backend"] == "ray"
    assert study_findings(distributed) == study_findings(local)
