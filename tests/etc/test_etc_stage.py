"""``midtrain etc`` end to end: on a ``sim collect`` dataset (answers checked in the simulator) and on
datasets without ground truth (generators skipped by name, the rest run)."""

from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import yaml
from etc_fixtures import plain_dataset, write_calibration

from midtrain.config import load_config
from midtrain.etc.config import DOMAINS, EtcConfig
from midtrain.etc.generators import GENERATORS
from midtrain.etc.stage import generate_etc
from midtrain.runs import RunDir, StageError

TASKS = ["push-v3", "pick-place-v3", "drawer-open-v3"]
SIZE = 64
_no_sim = importlib.util.find_spec("mujoco") is None or importlib.util.find_spec("metaworld") is None


def needs_sim(test):
    """Runs on a ``sim collect`` dataset recorded once per module (~15 s): slow, and skipped without the sim extra."""
    return pytest.mark.slow(pytest.mark.skipif(_no_sim, reason="the sim extra is not installed (pip install 'midtrain[sim]')")(test))


def points(text: str) -> np.ndarray:
    return np.array([[float(a), float(b)] for a, b in re.findall(r"\(([-\d.]+), ([-\d.]+)\)", text)])


def records(out) -> list[dict]:
    return [r for f in sorted((out / "llava").glob("domain_*.json")) for r in json.loads(f.read_text())]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    from midtrain.sim.collect import SimCollectConfig, collect_robot_corpus
    from midtrain.sim.metaworld_env import ensure_gl_backend

    ensure_gl_backend()
    run = RunDir(tmp_path_factory.mktemp("etc_sim"))
    collect_robot_corpus(SimCollectConfig(tasks=TASKS, episodes_per_task=1, max_steps=150, width=SIZE, height=SIZE,
                                          workers=1), run)  # fmt: skip
    out = generate_etc(EtcConfig(frame_stride=4), run)
    return run, out


@needs_sim
def test_every_generator_runs_on_a_sim_collect_dataset(sim_run):
    run, out = sim_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and not manifest["missing_fields"]
    assert {n: g["status"] for n, g in manifest["generators"].items()} == {n: "ran" for n in GENERATORS}
    assert all(g["samples"] > 0 for g in manifest["generators"].values())
    recs = records(out)
    assert len(recs) == manifest["counts"]["samples"] == sum(manifest["domains"].values())
    assert sum(manifest["categories"].values()) == len(recs)
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["domain"] in DOMAINS and r["etc_category"] == GENERATORS[r["generator"]].category
        images = r.get("images") or [r["image"]]
        assert r["conversations"][0]["value"].count("<image>") == len(images)
        assert all((out / "llava" / p).is_file() for p in images)
    files = list((out / "llava" / "images").rglob("*.png"))  # each used frame written once
    assert len(files) == manifest["counts"]["frames_written"] == len({p for r in recs for p in r.get("images") or [r["image"]]})


@needs_sim
def test_pointing_answers_land_on_the_rendered_object(sim_run):
    """Object and affordance points at the first frame of every episode, checked against the
    simulator's segmentation render of that state: the pixel shows a movable scene object."""
    from midtrain.sim.metaworld_env import TASK_INSTRUCTIONS, CameraView, GroundTruthProbe, episode_seed, make_env, reset_env

    run, out = sim_run
    task_of = {v: k for k, v in TASK_INSTRUCTIONS.items()}
    scenes: dict[str, tuple] = {}
    checked = 0
    for r in records(out):
        if r["generator"] not in ("point_object", "affordance_point") or r["frame"] != 0:
            continue
        if r["generator"] == "point_object" and "goal" in r["conversations"][0]["value"]:
            continue  # the goal is a marker site, not a geom
        task = task_of[r["instruction"]]
        if task not in scenes:  # the first frame's state: the episode's seeded reset
            env = make_env(task)
            reset_env(env, episode_seed(0, task, 0))
            view = CameraView(env.model, "corner", SIZE, SIZE)
            try:
                scenes[task] = (view.segmentation(env.data), GroundTruthProbe(env, view).object_geom, env.model)
            finally:
                view.close()
        seg, movable, model = scenes[task]
        ((x, y),) = points(r["conversations"][1]["value"])
        geom = seg[int(y * SIZE), int(x * SIZE)]
        assert geom >= 0 and movable[geom], (r["id"], model.geom(geom).name if geom >= 0 else geom)
        checked += 1
    assert checked >= len(TASKS)


@needs_sim
def test_trajectory_keypoints_are_the_replayed_gripper_positions(sim_run):
    """Replay the recorded actions in a fresh env; the gripper's projected positions 5, 10, ... steps
    after the asked frame are the answer's keypoints."""
    import pyarrow.parquet as pq

    from midtrain.sim.metaworld_env import TASK_INSTRUCTIONS, CameraView, episode_seed, make_env, reset_env

    run, out = sim_run
    rec = next(r for r in records(out) if r["generator"] == "future_trajectory" and r["episode"] == 1 and r["frame"] == 8)
    task = {v: k for k, v in TASK_INSTRUCTIONS.items()}[rec["instruction"]]
    data = pq.read_table(next((run.stage_dir("sim_collect") / "lerobot" / "data").rglob("*.parquet"))).to_pydict()
    actions = np.array(data["action"])[np.array(data["episode_index"]) == 1]
    env = make_env(task)
    reset_env(env, episode_seed(0, task, 0))
    view = CameraView(env.model, "corner", SIZE, SIZE)
    expected = []
    try:
        for step in range(8 + 20 + 1):
            if step in (13, 18, 23, 28):
                expected.append(view.project(env.data, env.tcp_center)[0][0] / SIZE)
            env.step(actions[step])
    finally:
        view.close()
    np.testing.assert_allclose(points(rec["conversations"][1]["value"]), expected, atol=1e-3)


@needs_sim
def test_catalog_reads_one_source_per_domain(sim_run):
    from midtrain.catalog.config import CatalogConfig
    from midtrain.catalog.stage import build_catalog

    run, out = sim_run
    sources = yaml.safe_load((out / "catalog_sources.yaml").read_text())["datasets"]
    assert {s["name"] for s in sources} == {f"etc_{slug}" for slug in DOMAINS.values()}
    catalog = build_catalog(load_config(CatalogConfig, base={"datasets": sources}), run)
    manifest = json.loads((catalog / "manifest.json").read_text())
    counts = json.loads((out / "manifest.json").read_text())["domains"]
    assert {name: s["written"] for name, s in manifest["sources"].items()} == {
        f"etc_{DOMAINS[d]}": n for d, n in counts.items()
    }


def test_a_dataset_without_ground_truth_runs_what_it_can(tmp_path):
    """No objects, no contact, no calibration: those generators are skipped naming the missing field;
    action and gripper questions run. With a calibration file and the end effector taken from the state,
    planning keypoints run too, and keypoints leaving the image are dropped and counted."""
    root = tmp_path / "plain"
    plain_dataset(root)
    run = RunDir(tmp_path / "run")
    out = generate_etc(EtcConfig(dataset=root), run)
    gens = json.loads((out / "manifest.json").read_text())["generators"]
    ran = {n for n, g in gens.items() if g["status"] == "ran"}
    assert ran == {"action_chunk", "frame_order", "gripper_next", "task_stage", "next_subaction"}
    assert "observation.object_pos" in gens["point_object"]["reason"] and "objects" in gens["point_object"]["missing"]
    assert "calibration" in gens["future_trajectory"]["reason"]

    config = EtcConfig(dataset=root, calibration=write_calibration(tmp_path / "cal.json"),
                       fields={"ee_pos": "observation.state[0:3]"}, generators=["future_trajectory", "gripper_point"])  # fmt: skip
    out = generate_etc(config, run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {n: g["status"] for n, g in manifest["generators"].items()} == {"future_trajectory": "ran", "gripper_point": "ran"}
    assert manifest["counts"]["keypoints_outside_image"] > 0 and manifest["counts"]["questions_dropped_outside_image"] > 0
    for r in records(out):
        pts = points(r["conversations"][1]["value"])
        assert len(pts) and (pts >= 0).all() and (pts <= 1).all()


def test_nothing_to_generate_is_an_error_naming_the_fields(tmp_path):
    root = tmp_path / "plain"
    plain_dataset(root, episodes=1, T=12)
    with pytest.raises(StageError, match="point_object: .*observation.object_pos"):
        generate_etc(EtcConfig(dataset=root, generators=["point_object", "relative_position"]), RunDir(tmp_path / "run"))
    with pytest.raises(StageError, match="fields.ee_pos.*selects 2 entries"):
        generate_etc(EtcConfig(dataset=root, fields={"ee_pos": "observation.state[0:2]"}), RunDir(tmp_path / "run2"))


def test_image_features_are_copied_byte_for_byte(tmp_path):
    """A dataset storing frames as images (dtype image, PNG bytes in the data Parquet): each used frame's
    bytes are written once as they are, not decoded and re-encoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from midtrain.data.images import encode_image

    root = tmp_path / "plain"
    plain_dataset(root, episodes=1, T=12)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.images.still"] = {"dtype": "image", "shape": [4, 4, 3], "names": ["height", "width", "channels"]}
    (root / "meta/info.json").write_text(json.dumps(info))
    data_path = root / "data/chunk-000/file-000.parquet"
    data = pq.read_table(data_path)
    stills = [encode_image(np.full((4, 4, 3), 10 * i, dtype=np.uint8)) for i in range(data.num_rows)]
    pq.write_table(data.append_column("observation.images.still", pa.array([{"bytes": b, "path": None} for b in stills])), data_path)
    out = generate_etc(EtcConfig(dataset=root, camera="observation.images.still", generators=["action_chunk"], frame_stride=3),
                       RunDir(tmp_path / "run"))  # fmt: skip
    recs = records(out)
    assert [r["frame"] for r in recs] == [0, 3]  # action_horizon 8 of 12 frames
    for r in recs:
        assert (out / "llava" / r["image"]).read_bytes() == stills[r["frame"]]
