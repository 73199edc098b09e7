"""The codec round trip gives the policy frames like the corpus's decoded frames."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from midtrain.eval.codec import FrameCodec, corpus_video_info, resolve_codec
from midtrain.eval.config import CodecSettings
from midtrain.runs import StageError


def _round_trip(frames, spec):
    codec = FrameCodec(spec, *frames.shape[1:3])
    codec.reset()
    return np.stack([codec(f) for f in frames]), codec.mode


def test_round_trip_frames_are_closer_to_the_corpus_than_raw_renders(tmp_path):
    """Frames of an expert episode, written by the corpus writer (libx264 crf 23, gop 2) and decoded,
    are what a policy trains on; the evaluator's round trip must land nearer to them than the raw
    render does (CALIBRATION: raw vs decoded costs most of the success)."""
    pytest.importorskip("metaworld")
    from midtrain.data.lerobot import LeRobotDatasetWriter
    from midtrain.sim.metaworld_env import CameraView, make_env, make_policy, run_episode

    env = make_env("pick-place-v3")
    view = CameraView(env.model, "corner", 128, 128)
    try:
        ep = run_episode(env, view, make_policy("pick-place-v3", "expert", 0), 1, 40)
    finally:
        view.close()
    root = tmp_path / "corpus"
    key = "observation.images.corner"
    with LeRobotDatasetWriter(root, fps=80, robot_type="sawyer", cameras={key: (128, 128)}, state_dim=4, action_dim=4) as w:
        w.add_episode(frames={key: ep.frames}, state=ep.state, action=ep.action, task="pick")
    with av.open(str(next(root.rglob("*.mp4")))) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    info_path, info = corpus_video_info(root)
    spec = resolve_codec(CodecSettings(), info["features"][key]["info"], info["fps"])
    assert (spec.encoder, spec.crf, spec.pix_fmt, spec.source) == ("libx264", 23, "yuv420p", "corpus")
    trip, mode = _round_trip(ep.frames, spec)
    err = lambda a, b: float(np.abs(a.astype(int) - b.astype(int)).mean())  # noqa: E731
    assert mode == "stream"
    assert err(trip, decoded) < 0.8 * err(ep.frames, decoded)  # measured: 2.7 vs 4.2
    assert 1.0 < err(trip, ep.frames) < 10.0  # lossy, as the corpus is
    again, _ = _round_trip(ep.frames, spec)
    np.testing.assert_array_equal(again, trip)  # reproducible per episode


def test_lossless_codec_is_the_identity():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 32, 48, 3), dtype=np.uint8)
    spec = resolve_codec(CodecSettings(name="libx264rgb", crf=0, pix_fmt="rgb24"), None, 10)
    trip, mode = _round_trip(frames, spec)
    assert mode == "stream"
    np.testing.assert_array_equal(trip, frames)


def test_codec_comes_from_the_corpus_info(tmp_path):
    meta = tmp_path / "run" / "sim_collect" / "lerobot" / "meta"
    meta.mkdir(parents=True)
    video = {"video.codec": "h264", "video.pix_fmt": "rgb24", "video.crf": 0}
    (meta / "info.json").write_text(json.dumps({"fps": 80, "features": {"k": {"dtype": "video", "info": video}}}))
    path, info = corpus_video_info(tmp_path / "run")  # a run directory resolves to its sim_collect dataset
    spec = resolve_codec(CodecSettings(), info["features"]["k"]["info"], 80)
    assert path == meta / "info.json" and (spec.encoder, spec.crf, spec.pix_fmt) == ("libx264rgb", 0, "rgb24")
    assert resolve_codec(CodecSettings(), {"video.codec": "av1", "video.pix_fmt": "yuv420p"}, 30).encoder == "libsvtav1"
    assert resolve_codec(CodecSettings(name="libx264", crf=18), {"video.codec": "av1"}, 30).crf == 18  # settings win
    with pytest.raises(StageError, match="has no meta/info.json"):
        corpus_video_info(tmp_path)
    with pytest.raises(StageError, match="cannot encode 'rgb24'"):
        resolve_codec(CodecSettings(name="libx264", pix_fmt="rgb24"), None, 30)


def test_a_lossless_corpus_resolves_to_its_lossless_codec(tmp_path):
    """sim collect's default corpus (libx264rgb, crf 0) records the stream's pixel format, planar
    GBR ('gbrp'), which libx264 cannot encode: the round trip must be libx264rgb from RGB, and the
    identity on the recorded frames."""
    from midtrain.data.lerobot import LeRobotDatasetWriter

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    key = "observation.images.corner"
    with LeRobotDatasetWriter(tmp_path / "c", fps=80, robot_type="sawyer", cameras={key: (32, 32)}, state_dim=2,
                              action_dim=2, video_codec="libx264rgb") as w:  # fmt: skip
        w.add_episode(frames={key: frames}, state=np.zeros((6, 2)), action=np.zeros((6, 2)), task="t")
    _, info = corpus_video_info(tmp_path / "c")
    assert info["features"][key]["info"]["video.pix_fmt"] == "gbrp"
    spec = resolve_codec(CodecSettings(), info["features"][key]["info"], info["fps"])
    assert (spec.encoder, spec.crf, spec.pix_fmt, spec.source) == ("libx264rgb", 0, "rgb24", "corpus")
    trip, _ = _round_trip(frames, spec)
    np.testing.assert_array_equal(trip, frames)
