"""A policy directory records how its training frames were made (``training_frames.json``, written
by ``midtrain vla``); ``midtrain eval`` makes its frames the same way by default and says in one
line where ``corpus=`` or ``frames=`` contradict the record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from midtrain.eval.codec import TRAINING_FRAMES_FILE, read_training_frames
from midtrain.eval.config import EvalSettings
from midtrain.eval.policies import PolicyInterface
from midtrain.runs import StageError
from midtrain.vla.data import training_frames_record

pytest.importorskip("metaworld")
from midtrain.eval.api import observation_spec  # noqa: E402
from midtrain.eval.simulators import benchmark_info  # noqa: E402

CAMERA = "observation.images.corner"
READS_CORNER = PolicyInterface(action_dim=4, camera_keys=(CAMERA,), image_size=(32, 32), state_dim=4)


def corpus(root, codec=None):
    """A one-episode LeRobot dataset of 32x32 frames: lossless (libx264rgb) or the writer's default (H.264 4:2:0)."""
    from midtrain.data.lerobot import LeRobotDatasetWriter

    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with LeRobotDatasetWriter(root, fps=80, robot_type="sawyer", cameras={CAMERA: (32, 32)}, state_dim=4, action_dim=4,
                              video_codec=codec) as w:  # fmt: skip
        w.add_episode(frames={CAMERA: frames}, state=np.zeros((4, 4), np.float32), action=np.zeros((4, 4), np.float32), task="t")
    return root


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {"lossless": corpus(root / "lossless", "libx264rgb"), "h264": corpus(root / "h264")}


def policy_dir(tmp_path, record):
    (tmp_path / "policy").mkdir(exist_ok=True)
    (tmp_path / "policy" / TRAINING_FRAMES_FILE).write_text(json.dumps(record))
    return read_training_frames(tmp_path / "policy")


def spec(record, **settings):
    s = EvalSettings(tasks=["reach-v3"], **settings)
    return observation_spec(s, benchmark_info(s), READS_CORNER, record)


def test_the_record_names_each_sources_video_codec(corpora, tmp_path):
    record = training_frames_record("lerobot", corpora["lossless"], [CAMERA], [32, 32])
    (source,) = record["sources"]
    assert source["format"] == "lerobot" and source["fps"] == 80 and source["path"] == str(corpora["lossless"])
    assert source["video"][CAMERA]["video.codec"] == "h264" and source["video"][CAMERA]["video.pix_fmt"] == "gbrp"
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    datasets = [{"name": "robot", "kind": "vla", "format": "lerobot", "path": str(corpora["h264"])},
                {"name": "pictures", "kind": "vla", "format": "images", "path": str(tmp_path)},
                {"name": "vqa", "kind": "vlm", "format": "parquet", "path": str(tmp_path)}]  # fmt: skip
    (catalog / "manifest.json").write_text(json.dumps({"config": {"datasets": datasets}}))
    record = training_frames_record("catalog", catalog, [CAMERA], [32, 32], {"robot", "pictures"})
    assert [s["name"] for s in record["sources"]] == ["robot", "pictures"]  # VLA sources the rows came from
    assert record["sources"][0]["video"][CAMERA]["video.pix_fmt"] == "yuv420p" and record["sources"][1]["video"] == {}


def test_eval_uses_the_recorded_lossless_codec_by_default(corpora, tmp_path):
    """Without corpus=, a policy trained on the lossless corpus gets lossless frames, not the
    writer's lossy H.264 (today's default: the codec trap CALIBRATION.md measured)."""
    record = policy_dir(tmp_path, training_frames_record("lerobot", corpora["lossless"], [CAMERA], [32, 32]))
    obs, provenance = spec(record)
    assert (obs.codec.encoder, obs.codec.crf, obs.codec.pix_fmt) == ("libx264rgb", 0, "rgb24")
    assert obs.codec.source == "policy record" and provenance["frames_from"] == "policy record" and obs.fps == 80
    assert provenance["training_frames"].endswith(TRAINING_FRAMES_FILE) and provenance["warnings"] == []
    assert spec(record, frames="raw")[1]["warnings"] == []  # raw renders are what a lossless corpus decodes to


def test_a_lossy_record_and_frames_raw_warn_in_one_line(corpora, tmp_path):
    record = policy_dir(tmp_path, training_frames_record("lerobot", corpora["h264"], [CAMERA], [32, 32]))
    obs, provenance = spec(record)
    assert (obs.codec.encoder, obs.codec.pix_fmt) == ("libx264", "yuv420p") and provenance["warnings"] == []
    obs, provenance = spec(record, frames="raw")
    assert obs.codec is None
    (warning,) = provenance["warnings"]
    assert "frames=raw" in warning and "libx264 crf 23 yuv420p" in warning and TRAINING_FRAMES_FILE in warning
    assert "\n" not in warning


def test_a_corpus_that_contradicts_the_record_warns_and_is_used(corpora, tmp_path):
    record = policy_dir(tmp_path, training_frames_record("lerobot", corpora["lossless"], [CAMERA], [32, 32]))
    obs, provenance = spec(record, corpus=corpora["h264"])
    assert obs.codec.encoder == "libx264" and provenance["frames_from"] == "corpus"  # corpus= is what the user asked for
    (warning,) = provenance["warnings"]
    assert str(corpora["h264"]) in warning and "libx264rgb crf 0 rgb24 (lossless)" in warning
    assert spec(record, corpus=corpora["lossless"])[1]["warnings"] == []
    (size_warning,) = spec(record, height=64, width=64)[1]["warnings"]
    assert "64x64" in size_warning and "32x32" in size_warning


def test_image_file_sources_mean_raw_frames(tmp_path):
    record = policy_dir(tmp_path, {"camera_keys": [CAMERA], "image_size": [32, 32],
                                   "sources": [{"name": "p", "format": "images", "path": "x", "video": {}}]})  # fmt: skip
    obs, provenance = spec(record)
    assert obs.codec is None and provenance["frames"] == "raw" and provenance["warnings"] == []
    (warning,) = spec(record, frames="codec")[1]["warnings"]
    assert "frames=raw" in warning and "image files" in warning


def test_no_record_and_no_corpus_warns_about_the_writer_defaults(tmp_path):
    obs, provenance = spec(None)
    assert obs.codec.source == "writer defaults"
    (warning,) = provenance["warnings"]
    assert "does not record" in warning and "corpus=" in warning and TRAINING_FRAMES_FILE in warning
    other_camera = {"camera_keys": [CAMERA], "image_size": [32, 32], "sources": [
        {"name": "r", "format": "lerobot", "path": "x", "video": {"observation.images.top": {"video.codec": "h264"}}}]}  # fmt: skip
    obs, provenance = spec(policy_dir(tmp_path, other_camera))
    (warning,) = provenance["warnings"]
    assert obs.codec.source == "writer defaults" and "records no video codec" in warning


def test_a_damaged_record_is_one_line_naming_the_file(tmp_path):
    (tmp_path / TRAINING_FRAMES_FILE).write_text('{"sources": [')
    with pytest.raises(StageError, match=TRAINING_FRAMES_FILE + ": not readable JSON"):
        read_training_frames(tmp_path)
    assert read_training_frames(tmp_path / "nothing-here") is None
