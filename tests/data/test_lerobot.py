"""LeRobot v3.0 writer -> reader round trip, v2.1 reading, action chunks, strides, cameras, image features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_fixtures import CAMERAS, FPS, make_lerobot_v3, make_lerobot_v21

from midtrain.data.images import load_image
from midtrain.data.lerobot import LeRobotDatasetWriter, LeRobotReader, action_chunks
from midtrain.data.sources import DatasetSource


def read_all(root: Path, seed: int = 0, **kw) -> list:
    src = DatasetSource(name="r", kind="vla", format="lerobot", path=root, **kw)
    return [item for _, item in LeRobotReader(src, seed).iter_samples()]


def assert_frames_match(rows, episodes, cameras, tol: float = 4.0):
    """Decoded images are within ``tol`` mean abs error of the frame written, and nearest to it."""
    for row in rows:
        frames = episodes[row["episode"]][0]
        for j, cam in enumerate(cameras):
            img = np.asarray(load_image(row["image_refs"][j])).astype(np.float64)
            errs = np.abs(frames[cam].astype(np.float64) - img).mean(axis=(1, 2, 3))
            assert errs[row["frame"]] < tol, (row["id"], cam, errs[row["frame"]])
            assert int(np.argmin(errs)) == row["frame"], (row["id"], cam)


def test_v30_round_trip_frames_state_actions_chunks(lerobot_v3):
    root, episodes = lerobot_v3
    rows = read_all(root, chunk_size=4, image_format="png")
    assert len(rows) == sum(len(e[2]) for e in episodes)
    assert [r["id"] for r in rows[:3]] == ["0/0", "0/1", "0/2"]
    for row in rows:
        _, state, action, task = episodes[row["episode"]]
        t, T = row["frame"], len(action)
        assert row["instruction"] == task
        assert np.array_equal(np.asarray(row["state"], dtype=np.float32), state[t])  # lossless
        steps = np.arange(t, t + 4)
        assert row["action_mask"] == (steps < T).tolist()
        expected = action[np.minimum(steps, T - 1)]  # padded by repeating the last action
        assert np.array_equal(np.asarray(row["action"], dtype=np.float32), expected)
    last = [r for r in rows if r["episode"] == 1][-1]
    assert last["frame"] == 4 and last["action_mask"] == [True, False, False, False]
    assert_frames_match(rows, episodes, list(CAMERAS))


def test_v30_metadata_is_lerobot_layout(lerobot_v3):
    root, episodes = lerobot_v3
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3
    assert info["features"]["observation.images.corner"]["info"]["video.codec"] == "h264"  # the default
    assert info["total_frames"] == 21 and info["total_tasks"] == 2 and info["splits"] == {"train": "0:3"}
    assert info["features"]["observation.images.corner"]["dtype"] == "video"
    assert info["features"]["action"]["shape"] == [3]
    tasks = pq.read_table(root / "meta/tasks.parquet").to_pandas()
    assert tasks.index.name == "task" and tasks.loc["task 1", "task_index"] == 1
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["length"] for e in eps] == [9, 5, 7]
    assert [e["dataset_from_index"] for e in eps] == [0, 9, 14]
    assert eps[1]["videos/observation.images.corner/from_timestamp"] == pytest.approx(0.9)
    assert eps[1]["tasks"] == ["task 1"]
    stats = json.loads((root / "meta/stats.json").read_text())
    all_actions = np.concatenate([e[2] for e in episodes])
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"]["std"], all_actions.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["observation.state"]["max"], np.concatenate([e[1] for e in episodes]).max(0))
    assert np.asarray(stats["observation.images.corner"]["mean"]).shape == (3, 1, 1)
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    assert data.column("index").to_pylist() == list(range(21))
    assert not list(root.rglob(".*.tmp"))


def test_av1_videos_decode_too(tmp_path):
    episodes = make_lerobot_v3(tmp_path / "av1", lengths=(6, 4), codec="libsvtav1", crf=20)
    info = json.loads((tmp_path / "av1/meta/info.json").read_text())
    assert info["features"]["observation.images.wrist"]["info"]["video.codec"] == "av1"
    rows = read_all(tmp_path / "av1", image_format="png")
    assert len(rows) == 10
    assert_frames_match(rows, episodes, list(CAMERAS))


def test_v21_layout_is_read(tmp_path):
    episodes = make_lerobot_v21(tmp_path / "v21")
    rows = read_all(tmp_path / "v21", chunk_size=3)
    assert [r["id"] for r in rows] == [f"0/{i}" for i in range(6)] + [f"1/{i}" for i in range(4)]
    assert rows[-1]["instruction"] == "v21 task 1" and rows[-1]["action_mask"] == [True, False, False]
    for row in rows:
        assert np.allclose(row["state"], episodes[row["episode"]][1][row["frame"]])
    assert_frames_match(rows, episodes, ["observation.images.top"], tol=6.0)  # JPEG on top of H.264


def test_stride_cameras_episodes_and_cap(lerobot_v3):
    root, episodes = lerobot_v3
    rows = read_all(root, frame_stride=3, cameras=["observation.images.wrist"], episodes=[0, 2])
    assert [r["id"] for r in rows] == ["0/0", "0/3", "0/6", "2/0", "2/3", "2/6"]
    assert all(len(r["image_refs"]) == 1 for r in rows)
    assert_frames_match(rows, episodes, ["observation.images.wrist"], tol=6.0)
    a = [r["id"] for r in read_all(root, max_samples=5, seed=7)]
    b = [r["id"] for r in read_all(root, max_samples=5, seed=7)]
    assert a == b and len(set(a)) == 5
    keys = [tuple(map(int, i.split("/"))) for i in a]
    assert keys == sorted(keys)


def test_image_dtype_features_are_read_from_parquet(tmp_path, lerobot_v3):
    """Datasets with ``dtype: image`` keep frames as HF image structs inside the data Parquet."""
    import shutil

    from midtrain.data.images import encode_image

    src_root, episodes = lerobot_v3
    root = tmp_path / "img"
    shutil.copytree(src_root, root)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.images.still"] = {"dtype": "image", "shape": [4, 4, 3], "names": ["height", "width", "channels"]}
    (root / "meta/info.json").write_text(json.dumps(info))
    data_path = root / "data/chunk-000/file-000.parquet"
    data = pq.read_table(data_path)
    stills = [{"bytes": encode_image(np.full((4, 4, 3), i, dtype=np.uint8)), "path": None} for i in range(data.num_rows)]
    pq.write_table(data.append_column("observation.images.still", pa.array(stills)), data_path)
    rows = read_all(root, cameras=["observation.images.still"], episodes=[1])
    assert [np.asarray(load_image(r["image_refs"][0]))[0, 0, 0] for r in rows] == list(range(9, 14))


def test_action_chunks_vectorised():
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunk, mask = action_chunks(actions, np.array([0, 3, 4]), 3)
    assert chunk.shape == (3, 3, 2)
    assert chunk[1].tolist() == [[6, 7], [8, 9], [8, 9]] and mask[1].tolist() == [True, True, False]
    assert mask[2].tolist() == [True, False, False]


def test_writer_validates_inputs_and_aborts_cleanly(tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        LeRobotDatasetWriter(tmp_path / "a", fps=FPS, robot_type=None, cameras={"c": (15, 16)}, state_dim=2, action_dim=2)
    root = tmp_path / "b"
    with pytest.raises(ValueError, match="state shape"):
        with LeRobotDatasetWriter(root, fps=FPS, robot_type=None, cameras={"c": (8, 8)}, state_dim=2, action_dim=2) as w:
            w.add_episode(frames={"c": np.zeros((3, 8, 8, 3), np.uint8)}, state=np.zeros((3, 2)), action=np.zeros((3, 2)), task="t")
            w.add_episode(frames={"c": np.zeros((3, 8, 8, 3), np.uint8)}, state=np.zeros((3, 2)), action=np.zeros((2, 2)), task="t")
    assert not (root / "meta/info.json").exists() and not list(root.rglob("*.mp4"))
    assert not list(root.rglob(".*.tmp"))
    with pytest.raises(FileExistsError):
        LeRobotDatasetWriter(root, fps=FPS, robot_type=None, cameras={}, state_dim=2, action_dim=2)


def test_video_frames_seek_backward_and_across_gaps(tmp_path):
    """Nearest-frame lookup stays right when requests jump back or far ahead (keyframe seeks)."""
    from catalog_fixtures import encode_video

    from midtrain.data.lerobot import VideoFrames

    T = 80  # 8 s at 10 fps; the grey level encodes the frame index
    frames = np.repeat((np.arange(T, dtype=np.uint8) * 3)[:, None, None, None], 16, axis=1)
    frames = np.ascontiguousarray(np.broadcast_to(frames, (T, 16, 16, 3)))
    encode_video(tmp_path / "v.mp4", frames)
    video = VideoFrames(tmp_path / "v.mp4", tolerance_s=0.05)
    for request in ([0, 1, 2], [70, 71], [5, 6], [40], [79], [3]):
        got = video.frames_at(np.asarray(request) / FPS + 0.01)  # slightly off-grid: nearest frame wins
        assert [int(round(g.mean() / 3)) for g in got] == request
    with pytest.raises(LookupError, match="no frame within"):
        video.frames_at(np.array([T / FPS + 1.0]))
    video.close()


def test_capped_read_decodes_the_right_frames(lerobot_v3):
    root, episodes = lerobot_v3
    rows = read_all(root, max_samples=4, seed=3, image_format="png")
    assert len(rows) == 4
    assert_frames_match(rows, episodes, list(CAMERAS))


def test_wrong_state_key_is_an_error(lerobot_v3):
    from midtrain.runs import StageError

    with pytest.raises(StageError, match="state_key: feature 'observation.joints' not in"):
        read_all(lerobot_v3[0], state_key="observation.joints")
