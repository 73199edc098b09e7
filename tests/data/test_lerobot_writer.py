"""``LeRobotDatasetWriter``: extra per-frame features, meta documents and lossless video stay a
valid LeRobot v3.0 dataset that our reader and LeRobot's feature mapping read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from midtrain.data.lerobot import LeRobotDatasetWriter, LeRobotReader
from midtrain.data.sources import DatasetSource

CAM = "observation.images.front"


def _frames(T: int, h: int, w: int, seed: int) -> np.ndarray:
    """Noise frames: the hardest case for a lossy codec, so only a lossless one returns them exactly."""
    return np.random.default_rng(seed).integers(0, 256, size=(T, h, w, 3), dtype=np.uint8)


def hf_features_like_lerobot(features: dict):
    """LeRobot's ``get_hf_features_from_features`` (datasets/feature_utils.py) for the dtypes we write; LeRobot
    turns info.json shapes into tuples first, so shape [1] is a scalar ``Value``."""
    import datasets

    out = {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        if list(ft["shape"]) == [1]:
            out[key] = datasets.Value(ft["dtype"])
        else:
            out[key] = datasets.Sequence(length=ft["shape"][0], feature=datasets.Value(ft["dtype"]))
    return datasets.Features(out)


@pytest.fixture(scope="module")
def with_extras(tmp_path_factory):
    root = tmp_path_factory.mktemp("extras") / "ds"
    rng = np.random.default_rng(1)
    extras = {"observation.ee_pos": ["x", "y", "z"], "observation.contact": ["in_contact"]}
    episodes = []
    with LeRobotDatasetWriter(root, fps=20, robot_type="sim", cameras={CAM: (24, 30)}, state_dim=1, action_dim=2,
                              video_codec="libx264rgb", extra_features=extras,
                              meta={"calibration.json": {"cameras": {}}}) as w:  # fmt: skip
        for e, T in enumerate((6, 4)):
            extra = {"observation.ee_pos": rng.normal(size=(T, 3)), "observation.contact": (rng.random((T, 1)) > 0.5)}
            frames = _frames(T, 24, 30, e)
            w.add_episode({CAM: frames}, rng.normal(size=(T, 1)), rng.normal(size=(T, 2)), f"task {e}", extra=extra)
            episodes.append((frames, extra))
    return root, episodes


def test_extra_features_are_columns_features_and_stats(with_extras):
    root, episodes = with_extras
    info = json.loads((root / "meta/info.json").read_text())
    assert info["features"]["observation.ee_pos"] == {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]}
    assert info["features"]["observation.contact"]["shape"] == [1]
    data = pq.read_table(root / "data/chunk-000/file-000.parquet")
    ee = np.concatenate([x["observation.ee_pos"] for _, x in episodes]).astype(np.float32)
    np.testing.assert_array_equal(np.array(data.column("observation.ee_pos").to_pylist(), dtype=np.float32), ee)
    stats = json.loads((root / "meta/stats.json").read_text())
    np.testing.assert_allclose(stats["observation.ee_pos"]["mean"], ee.mean(0), rtol=1e-5, atol=1e-6)
    contact = np.concatenate([x["observation.contact"] for _, x in episodes]).astype(np.float64)
    np.testing.assert_allclose(stats["observation.contact"]["max"], contact.max(0))
    eps = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").schema.names
    assert "stats/observation.ee_pos/mean" in eps and "stats/observation.contact/count" in eps
    assert json.loads((root / "meta/calibration.json").read_text()) == {"cameras": {}}


def test_data_files_load_with_lerobots_feature_schema(with_extras):
    """LeRobot loads data Parquet with HF features derived from info.json: every non-video feature is a
    column of exactly that type (a mismatch raises in the cast)."""
    import datasets

    root, _ = with_extras
    features = hf_features_like_lerobot(json.loads((root / "meta/info.json").read_text())["features"])
    ds = datasets.Dataset.from_parquet(str(root / "data/chunk-000/file-000.parquet"), features=features)
    assert set(ds.column_names) == set(features) and len(ds) == 10
    assert len(ds[0]["observation.ee_pos"]) == 3


def test_lossless_codec_round_trips_frames_exactly(with_extras):
    root, episodes = with_extras
    info = json.loads((root / "meta/info.json").read_text())["features"][CAM]["info"]
    assert (info["video.codec"], info["video.pix_fmt"]) == ("h264", "gbrp")
    reader = LeRobotReader(DatasetSource(name="x", kind="vla", format="lerobot", path=root, image_format="png"), seed=0)
    from midtrain.data.images import load_image

    rows = [row for _, row in reader.iter_samples()]
    decoded = np.stack([np.asarray(load_image(r["image_refs"][0])) for r in rows])
    np.testing.assert_array_equal(decoded, np.concatenate([f for f, _ in episodes]))


def test_lossy_default_does_not_round_trip_noise(tmp_path):
    """The oracle above can fail: the default yuv420p H.264 changes noise frames."""
    frames = _frames(4, 24, 30, 0)
    with LeRobotDatasetWriter(tmp_path / "ds", fps=20, robot_type=None, cameras={CAM: (24, 30)}, state_dim=1,
                              action_dim=1) as w:  # fmt: skip
        w.add_episode({CAM: frames}, np.zeros((4, 1)), np.zeros((4, 1)), "t")
    reader = LeRobotReader(DatasetSource(name="x", kind="vla", format="lerobot", path=tmp_path / "ds", image_format="png"), 0)
    from midtrain.data.images import load_image

    decoded = np.stack([np.asarray(load_image(row["image_refs"][0])) for _, row in reader.iter_samples()])
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() > 5


def test_extra_features_are_validated(tmp_path):
    kwargs = dict(fps=10, robot_type=None, cameras={CAM: (8, 8)}, state_dim=1, action_dim=1)
    with pytest.raises(ValueError, match="extra_features.*action"):
        LeRobotDatasetWriter(tmp_path / "a", extra_features={"action": ["x"]}, **kwargs)
    with pytest.raises(ValueError, match="pix_fmt.*libx264rgb"):
        LeRobotDatasetWriter(tmp_path / "b", video_codec="libx264rgb", pix_fmt="yuv420p", **kwargs)
    w = LeRobotDatasetWriter(tmp_path / "c", extra_features={"observation.ee_pos": ["x", "y", "z"]}, **kwargs)
    frames, zeros = {CAM: np.zeros((2, 8, 8, 3), np.uint8)}, np.zeros((2, 1))
    with pytest.raises(ValueError, match="extra features"):
        w.add_episode(frames, zeros, zeros, "t")
    with pytest.raises(ValueError, match=r"extra\['observation.ee_pos'\] shape \(2, 2\)"):
        w.add_episode(frames, zeros, zeros, "t", extra={"observation.ee_pos": np.zeros((2, 2))})
    w.abort()
