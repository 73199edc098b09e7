"""Catalog throughput on LeRobot video: sequential decoding (ours) vs a per-frame seek baseline.

Random-access loaders (a ``__getitem__`` per frame, as training dataloaders do) seek to
each frame's timestamp and decode from the preceding keyframe. The catalog visits every
kept frame in order, so ``LeRobotReader`` decodes each video file in one forward pass.
Both paths produce the same frames (checked) and the same JPEG encoding, so the ratio
isolates the decoding strategy.

    python benchmarks/catalog_lerobot.py [--quick]

Ends with one JSON line: frames/s of both paths and their ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from midtrain.data.images import encode_image
from midtrain.data.lerobot import LeRobotDatasetWriter, LeRobotReader
from midtrain.data.sources import DatasetSource

CAMERA = "observation.images.front"


def build_dataset(root: Path, episodes: int, length: int, hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    with LeRobotDatasetWriter(root, fps=10, robot_type="bench", cameras={CAMERA: hw}, state_dim=8, action_dim=4) as wr:
        for e in range(episodes):
            t = np.arange(length)[:, None, None]
            frames = np.zeros((length, h, w, 3), dtype=np.uint8)  # a moving gradient scene
            frames[..., 0] = ((xx[None] + 3 * t + 10 * e) % 256).astype(np.uint8)
            frames[..., 1] = ((yy[None] * 2 + t) % 256).astype(np.uint8)
            frames[..., 2] = 128
            wr.add_episode(frames={CAMERA: frames}, state=rng.normal(size=(length, 8)), action=rng.normal(size=(length, 4)),
                           task=f"task {e % 5}")


def per_frame_seek_baseline(root: Path) -> list[bytes]:
    """Seek + decode-to-timestamp for every frame (one open container per file, as a worker would keep)."""
    import av
    import av.video.reformatter
    import pyarrow.parquet as pq

    eps = pq.read_table(next((root / "meta/episodes").glob("*/*.parquet"))).to_pylist()
    data = pq.read_table(next((root / "data").glob("*/*.parquet")), columns=["episode_index", "timestamp"]).to_pylist()
    starts = {e["episode_index"]: e[f"videos/{CAMERA}/from_timestamp"] for e in eps}
    path = next((root / "videos" / CAMERA).glob("*/*.mp4"))
    out = []
    rgb = av.video.reformatter.VideoReformatter()  # the same fast RGB conversion as the reader
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for row in data:
            t = starts[row["episode_index"]] + row["timestamp"]
            container.seek(int(t / stream.time_base), stream=stream, backward=True)
            best = None
            for frame in container.decode(stream):
                if best is None or abs(frame.time - t) < abs(best.time - t):
                    best = frame
                if frame.time >= t - 1e-6:
                    break
            out.append(encode_image(rgb.reformat(best, format="rgb24").to_ndarray(), "JPEG"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller dataset (seconds instead of a minute)")
    args = parser.parse_args()
    episodes, length, hw = (8, 50, (96, 128)) if args.quick else (30, 100, (192, 256))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        t0 = time.perf_counter()
        build_dataset(root, episodes, length, hw)
        write_s = time.perf_counter() - t0
        n = episodes * length

        t0 = time.perf_counter()
        reader = LeRobotReader(DatasetSource(name="b", kind="vla", format="lerobot", path=root), seed=0)
        ours = [row["image_refs"][0]["bytes"] for _, row in reader.iter_samples()]
        ours_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        base = per_frame_seek_baseline(root)
        base_s = time.perf_counter() - t0

    assert len(ours) == len(base) == n
    identical = sum(a == b for a, b in zip(ours, base))
    print(f"dataset: {episodes} episodes x {length} frames at {hw[0]}x{hw[1]} (written in {write_s:.1f}s)")
    print(f"sequential (LeRobotReader, full catalog rows): {n / ours_s:8.1f} frames/s")
    print(f"per-frame seek baseline (frames only):        {n / base_s:8.1f} frames/s")
    print(f"ratio: {base_s / ours_s:.2f}x; identical JPEG frames: {identical}/{n}")
    print(json.dumps({"bench": "catalog_lerobot", "frames": n, "sequential_fps": round(n / ours_s, 1),
                      "seek_fps": round(n / base_s, 1), "ratio": round(base_s / ours_s, 2),
                      "identical_frames": identical, "quick": args.quick}))  # fmt: skip


if __name__ == "__main__":
    main()
