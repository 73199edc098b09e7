"""Benchmark: ``midtrain etc`` samples per second per core, against decoding the same frames alone.

The dataset is a LeRobot v3.0 dataset laid out as ``sim collect`` writes it (lossless H.264 frames
at 128 px, the per-frame ground-truth features, ``meta/calibration.json`` and ``meta/objects.json``),
with synthetic episodes (a smooth moving scene, an end effector that approaches an object, closes
the gripper and carries it) so it is built in seconds; ``--dataset`` takes a real one (e.g.
``<run>/sim_collect/lerobot``).

- baseline: decode every ``frame_stride``-th frame of every episode with the reader's
  ``VideoFrames`` (one forward pass per file), nothing else;
- etc: the whole stage (``generate_etc``): read the episodes, run all 13 generators, decode and
  write each used frame once (PNG), write the LLaVA JSON files and the manifest.

CPU time is the process's (all threads), so "per core" counts the decoder's threads too. Checks:
every frame etc wrote equals the baseline's decoded frame, and the JSON files hold the manifest's
sample count. The last line is one JSON object with ``samples_per_s_per_core``.

    python benchmarks/etc.py [--quick] [--dataset PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def build_dataset(root: Path, episodes: int, length: int, size: int = 128) -> None:
    from midtrain.data.calibration import CameraCalibration, calibration_json
    from midtrain.data.lerobot import LeRobotDatasetWriter
    from midtrain.sim.metaworld_env import ground_truth_features

    cam_key = "observation.images.corner"
    focal = size * 0.8
    intr = np.array([focal, focal, size / 2, size / 2])
    extr = np.array([[1.0, 0, 0, 0], [0, -1.0, 0, 0.6], [0, 0, -1.0, 1.2]])  # overhead, looking at (0, 0.6, 0)
    features = ground_truth_features("corner")
    objects = {"push the puck to the goal": {"task": "push-v3", "objects": ["puck"], "goal": "goal position",
                                             "verb": "push", "target": "object"},
               "pick up the puck and place it at the goal": {"task": "pick-place-v3", "objects": ["puck"],
                                                             "goal": "goal position", "verb": "grasp", "target": "object"}}  # fmt: skip
    meta = {"calibration.json": calibration_json([CameraCalibration(cam_key, size, size, intr, extr,
                                                                    "observation.cameras.corner.intrinsics",
                                                                    "observation.cameras.corner.extrinsics")], "bench"),
            "objects.json": {"tasks": objects}}  # fmt: skip
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    with LeRobotDatasetWriter(root, fps=80, robot_type="sawyer", cameras={cam_key: (size, size)}, state_dim=4, action_dim=4,
                              video_codec="libx264rgb", extra_features=features, meta=meta) as w:  # fmt: skip
        for e in range(episodes):
            t = np.arange(length)
            obj = np.array([rng.uniform(-0.2, 0.2), rng.uniform(0.5, 0.7), 0.02])
            start = np.array([0.0, 0.6, 0.2])
            reach = np.clip(t / (length * 0.4), 0, 1)[:, None]
            ee = start + reach * (obj + [0, 0, 0.03] - start) + np.clip((t - length * 0.6) / length, 0, 1)[:, None] * [0.1, 0.1, 0.05]
            closed = t >= length * 0.45
            opening = np.where(closed, np.maximum(0.45, 1 - 0.1 * (t - length * 0.45)), 1.0)
            contact = (t >= length * 0.5).astype(np.float32)
            obj_t = np.where(contact[:, None] > 0, ee - [0, 0, 0.03], obj)
            u = size / 2 + focal * ee[:, 0] / (1.2 - ee[:, 2])
            v = size / 2 + focal * (ee[:, 1] - 0.6) / (1.2 - ee[:, 2])
            frames = np.empty((length, size, size, 3), dtype=np.uint8)
            for k in range(length):  # a smooth scene with a moving blob, as compressible as a render
                blob = np.exp(-((xx - u[k]) ** 2 + (yy - v[k]) ** 2) / 30.0)
                frames[k, ..., 0] = (120 + 100 * blob).astype(np.uint8)
                frames[k, ..., 1] = (xx * 0.5 + 60).astype(np.uint8)
                frames[k, ..., 2] = (yy * 0.5 + 60 + 40 * blob).astype(np.uint8)
            action = np.concatenate([np.diff(ee, axis=0, append=ee[-1:]) * 50, np.where(closed, 1.0, -1.0)[:, None]], axis=1)
            extra = {
                "observation.ee_pos": ee, "observation.gripper_opening": opening[:, None], "observation.contact": contact[:, None],
                "observation.object_pos": np.concatenate([obj_t, np.zeros((length, 3))], axis=1),
                "observation.goal_pos": np.tile(obj + [0.1, 0.1, 0], (length, 1)),
                "observation.cameras.corner.intrinsics": np.tile(intr, (length, 1)),
                "observation.cameras.corner.extrinsics": np.tile(extr.reshape(12), (length, 1)),
            }  # fmt: skip
            state = np.concatenate([ee, opening[:, None]], axis=1)
            w.add_episode({cam_key: frames}, state, action, list(objects)[e % 2], extra=extra)


def decode_baseline(root: Path, stride: int) -> tuple[dict, float, float]:
    """Decode the frames etc uses (every stride-th of each episode) and nothing else."""
    from midtrain.data.lerobot import LeRobotReader, VideoFrames
    from midtrain.data.sources import DatasetSource

    reader = LeRobotReader(DatasetSource(name="b", kind="vla", format="lerobot", path=root), seed=0)
    cam = reader.cameras[0]
    wall, cpu = time.perf_counter(), time.process_time()
    out, videos = {}, {}
    for ep in reader.episodes:
        path, start = ep.videos[cam]
        if path not in videos:
            videos[path] = VideoFrames(path, tolerance_s=0.5 / reader.fps + 1e-4)
        keep = np.arange(0, ep.length, stride)
        for f, frame in zip(keep, videos[path].frames_at(start + keep / reader.fps)):
            out[(ep.index, int(f))] = frame
    for v in videos.values():
        v.close()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smaller dataset (seconds)")
    parser.add_argument("--dataset", type=Path, help="a LeRobot dataset with ground truth (default: built here)")
    parser.add_argument("--frame-stride", type=int, default=4)
    args = parser.parse_args()
    from PIL import Image

    from midtrain.etc.config import EtcConfig
    from midtrain.etc.stage import generate_etc
    from midtrain.runs import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dataset
        if root is None:
            root = Path(tmp) / "ds"
            episodes, length = (8, 100) if args.quick else (60, 150)
            t0 = time.perf_counter()
            build_dataset(root, episodes, length)
            print(f"built {episodes} episodes x {length} frames at 128 px in {time.perf_counter() - t0:.1f}s")
        generate_etc(EtcConfig(dataset=root, frame_stride=args.frame_stride), RunDir(Path(tmp) / "warm"))  # imports, caches
        frames, base_wall, base_cpu = decode_baseline(root, args.frame_stride)
        wall, cpu = time.perf_counter(), time.process_time()
        out = generate_etc(EtcConfig(dataset=root, frame_stride=args.frame_stride), RunDir(Path(tmp) / "run"))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        manifest = json.loads((out / "manifest.json").read_text())
        samples = manifest["counts"]["samples"]
        in_files = sum(len(json.loads(p.read_text())) for p in (out / "llava").glob("domain_*.json"))
        assert in_files == samples, (in_files, samples)
        written = sorted((out / "llava" / "images").rglob("*.png"))
        for path in written[:: max(1, len(written) // 50)]:
            key = (int(path.parent.name), int(path.stem))
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), frames[key]), path
    decoded = len(frames)
    phases = {k: v for k, v in manifest["timings"].items() if k not in ("started", "wall_s")}
    print(f"baseline: decode {decoded} frames alone: {base_wall:.2f}s wall, {base_cpu:.2f}s CPU ({decoded / base_cpu:.0f} frames/CPU-s)")
    print(f"etc: {samples} samples, {len(written)} frames written: {wall:.2f}s wall, {cpu:.2f}s CPU; phases {phases}")
    print(f"samples/s per core: {samples / cpu:.0f} (wall {samples / wall:.0f}); etc / decode-alone CPU: {cpu / base_cpu:.2f}x; "
          f"checked {len(written[:: max(1, len(written) // 50)])} written frames equal the decoded ones")  # fmt: skip
    print(json.dumps({"bench": "etc", "samples": samples, "frames": len(written), "samples_per_s_per_core": round(samples / cpu, 1),
                      "samples_per_s_wall": round(samples / wall, 1), "etc_cpu_s": round(cpu, 3), "decode_cpu_s": round(base_cpu, 3),
                      "etc_over_decode": round(cpu / base_cpu, 2), "per_generator": {n: g["samples"] for n, g in manifest["generators"].items()},
                      "quick": args.quick}))  # fmt: skip


if __name__ == "__main__":
    main()
