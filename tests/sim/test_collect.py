"""``sim collect``: a readable LeRobot dataset of successful expert episodes, success filtering."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from midtrain.config import ConfigError, load_config
from midtrain.runs import RunDir, StageError
from midtrain.sim.collect import EpisodeJob, SimCollectConfig, collect_robot_corpus, record_episode
from midtrain.sim.metaworld_env import TASK_INSTRUCTIONS, episode_seed

TASKS = ["reach-v3", "button-press-topdown-v3"]


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Two tasks, one episode each, rendered by two worker processes."""
    run = RunDir(tmp_path_factory.mktemp("collect"))
    config = SimCollectConfig(tasks=TASKS, episodes_per_task=1, max_steps=150, width=64, height=64, workers=2)
    out = collect_robot_corpus(config, run)
    return run, config, out


def _reference_episode(config: SimCollectConfig, task: str, index: int):
    """The same episode recorded in this process, for comparison with the workers' output."""
    job = EpisodeJob(task, index, episode_seed(config.seed, task, index), config.camera, config.width,
                     config.height, config.policy, config.max_steps)  # fmt: skip
    return record_episode(job)


@pytest.mark.slow
def test_collect_writes_a_lerobot_v3_dataset_with_success_rates(collected):
    run, config, out = collected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["success_rate"] == 1.0
    assert {t: s["succeeded"] for t, s in manifest["success"].items()} == {t: 1 for t in TASKS}
    assert manifest["render"]["frames"] > 0 and manifest["render"]["fps_per_process"] > 0
    info = json.loads((out / "lerobot" / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == "sawyer" and info["fps"] == 80
    assert info["total_episodes"] == 2 and info["total_tasks"] == 2
    assert info["features"]["observation.images.corner"]["shape"] == [64, 64, 3]
    assert info["features"]["observation.state"]["names"] == ["hand_x", "hand_y", "hand_z", "gripper_opening"]
    assert info["total_frames"] == manifest["counts"]["written"]


@pytest.mark.slow
def test_dataset_matches_episodes_recorded_in_process(collected):
    """Workers and this process record the same episodes: states and actions exactly."""
    run, config, out = collected
    data = pq.read_table(sorted((out / "lerobot" / "data").rglob("*.parquet"))[0]).to_pydict()
    episode_index = np.array(data["episode_index"])
    for k, task in enumerate(TASKS):
        reference = _reference_episode(config, task, 0)
        rows = episode_index == k
        np.testing.assert_array_equal(np.array(data["observation.state"], dtype=np.float32)[rows], reference.state)
        np.testing.assert_array_equal(np.array(data["action"], dtype=np.float32)[rows], reference.action)


@pytest.mark.slow
def test_dataset_reads_back_through_the_catalog(collected):
    """The catalog's LeRobot reader decodes the videos: the rendered frames exactly (lossless video),
    instructions per task."""
    from midtrain.catalog.config import CatalogConfig
    from midtrain.catalog.stage import build_catalog
    from midtrain.data.catalog import iter_catalog
    from midtrain.data.images import load_image
    from midtrain.data.sources import DatasetSource

    run, config, out = collected
    source = DatasetSource(name="metaworld", kind="vla", format="lerobot", path=out / "lerobot", image_format="png")
    catalog = build_catalog(CatalogConfig(datasets=[source]), run)
    rows = [row for batch in iter_catalog(catalog) for row in batch.to_pylist()]
    reference = _reference_episode(config, TASKS[0], 0)
    first = [r for r in rows if r["episode"] == 0]
    assert len(first) == len(reference.frames)
    assert {r["instruction"] for r in rows} == {TASK_INSTRUCTIONS[t] for t in TASKS}
    decoded = np.stack([np.asarray(load_image(r["image_refs"][0])) for r in sorted(first, key=lambda r: r["frame"])])
    np.testing.assert_array_equal(decoded, reference.frames)


@pytest.mark.slow
def test_ground_truth_is_recorded_per_frame_with_calibration_and_names(collected):
    """Extra features in info.json, stats and data (equal to the episode recorded in process), the
    calibration and object names in meta/."""
    from midtrain.data.calibration import load_calibration, project_points
    from midtrain.sim.metaworld_env import TASK_OBJECTS, ground_truth_features

    run, config, out = collected
    root = out / "lerobot"
    info = json.loads((root / "meta" / "info.json").read_text())
    stats = json.loads((root / "meta" / "stats.json").read_text())
    for key, names in ground_truth_features("corner").items():
        assert info["features"][key] == {"dtype": "float32", "shape": [len(names)], "names": names}
        assert len(np.atleast_1d(stats[key]["mean"])) == len(names)
    data = pq.read_table(sorted((root / "data").rglob("*.parquet"))[0]).to_pydict()
    episode_index = np.array(data["episode_index"])
    reference = _reference_episode(config, TASKS[0], 0)
    for key, values in reference.ground_truth.items():
        column = np.array(data[key], dtype=np.float32).reshape(len(episode_index), -1)[episode_index == 0]
        np.testing.assert_array_equal(column, values)
    cameras = load_calibration(root / "meta" / "calibration.json")
    cam = cameras["observation.images.corner"]
    assert (cam.width, cam.height, cam.static) == (64, 64, True)
    assert cam.extrinsics_feature == "observation.cameras.corner.extrinsics"
    np.testing.assert_allclose(cam.extrinsics.reshape(12), reference.ground_truth[cam.extrinsics_feature][0], rtol=1e-6)
    pixels, depth = project_points(reference.ground_truth["observation.ee_pos"], cam.intrinsics, cam.extrinsics)
    assert (depth > 0).all() and ((pixels >= 0) & (pixels < 64)).all()  # the gripper stays in view
    objects = json.loads((root / "meta" / "objects.json").read_text())["tasks"]
    assert {v["task"] for v in objects.values()} == set(TASKS)
    assert objects[TASK_INSTRUCTIONS["reach-v3"]]["objects"] == list(TASK_OBJECTS["reach-v3"].objects)
    assert info["features"]["observation.images.corner"]["info"]["video.pix_fmt"] == "gbrp"


@pytest.mark.slow
def test_failed_episodes_are_dropped_and_counted(tmp_path):
    """reach-v3 with 48 steps: the seeded episodes 1 and 2 finish in time, 0 and 3 do not."""
    config = SimCollectConfig(tasks=["reach-v3"], episodes_per_task=4, max_steps=48, width=32, height=32, workers=1)
    out = collect_robot_corpus(config, RunDir(tmp_path))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["success"]["reach-v3"]["succeeded"] == 2 and manifest["success"]["reach-v3"]["rate"] == 0.5
    assert manifest["counts"]["episodes_failed"] == 2 and manifest["counts"]["episodes_kept"] == 2
    episodes = pq.read_table(sorted((out / "lerobot" / "meta" / "episodes").rglob("*.parquet"))[0]).to_pydict()
    assert len(episodes["episode_index"]) == 2 and max(episodes["length"]) <= 48


@pytest.mark.slow
def test_no_successful_episode_fails_the_stage_and_reports_rates(tmp_path):
    config = SimCollectConfig(tasks=["reach-v3", "push-v3"], episodes_per_task=1, max_steps=10, width=32,
                              height=32, policy="zero", workers=1)  # fmt: skip
    with pytest.raises(StageError, match="no episode succeeded.*reach-v3 0/1"):
        collect_robot_corpus(config, RunDir(tmp_path))
    manifest = json.loads((tmp_path / ".partial" / "sim_collect" / "manifest.json").read_text())  # the failed attempt
    assert manifest["status"] == "failed"
    assert manifest["success_rate"] == 0.0 and manifest["success"]["push-v3"]["rate"] == 0.0
    assert not (tmp_path / "sim_collect" / "lerobot" / "meta" / "info.json").exists()


@pytest.mark.parametrize(
    "override, key",
    [("tasks=[pick-place-v2]", "tasks"), ("width=63", "width"), ("camera=front", "camera"),
     ("max_steps=501", "max_steps"), ("episodes_per_task=0", "episodes_per_task")],
)  # fmt: skip
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(SimCollectConfig, overrides=[override])


@pytest.mark.slow
def test_an_interrupted_collection_starts_the_dataset_over(tmp_path):
    config = SimCollectConfig(tasks=["reach-v3"], episodes_per_task=1, max_steps=100, width=32, height=32, workers=1)
    out = collect_robot_corpus(config, RunDir(tmp_path))
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["status"] = "running"  # as if killed mid-way, leaving a partial dataset behind
    manifest_path.write_text(json.dumps(manifest))
    (out / "lerobot" / "meta" / "info.json").unlink()
    (out / "lerobot" / "data" / "chunk-000" / ".file-000.parquet.tmp").write_bytes(b"partial")
    collect_robot_corpus(config, RunDir(tmp_path))
    assert json.loads(manifest_path.read_text())["status"] == "complete"
    assert json.loads((out / "lerobot" / "meta" / "info.json").read_text())["total_episodes"] == 1
    assert not list((out / "lerobot").rglob("*.tmp"))
