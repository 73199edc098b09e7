"""Builders of tiny LLaVA/Parquet/HF/LeRobot datasets for the catalog tests (fixtures in conftest.py).

A uniquely named module, so ``from catalog_fixtures import ...`` cannot pick up another
folder's ``conftest``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

FPS = 10


def interrupt_second_part(monkeypatch) -> None:
    """Make the catalog stage stop (KeyboardInterrupt) as it starts its second part, as a kill would."""
    import midtrain.catalog.stage as build

    calls = {"n": 0}
    real = build._write_part

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "_write_part", interrupted)


def write_png(path: Path, value: int, size=(24, 32)) -> Path:
    """A small image whose pixels encode ``value`` (so tests can tell images apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*size, 3), dtype=np.uint8)
    arr[..., 0] = value % 256
    arr[..., 1] = np.linspace(0, 255, size[1], dtype=np.uint8)[None, :]
    Image.fromarray(arr).save(path)
    return path


def llava_records(image_dir: Path, n: int = 6) -> list[dict]:
    """Mixed LLaVA / ShareGPT / messages-style records, images as relative paths."""
    recs = []
    for i in range(n):
        write_png(image_dir / f"img{i}.png", 10 * i)
        if i % 3 == 0:
            recs.append({"id": f"s{i}", "image": f"images/img{i}.png",
                         "conversations": [{"from": "human", "value": f"<image>\nWhat is {i}?"},
                                           {"from": "gpt", "value": f"It is {i}."}]})
        elif i % 3 == 1:  # no placeholder: the reader prepends one
            recs.append({"id": f"s{i}", "images": [f"images/img{i}.png"],
                         "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"Describe {i}."},
                                      {"role": "assistant", "content": f"Thing {i}."}]})
        else:  # text only, no id: the index is used
            recs.append({"conversations": [{"from": "human", "value": f"Say {i}"}, {"from": "gpt", "value": str(i)}]})
    return recs


def episode_arrays(e: int, T: int, cameras: dict, rng: np.random.Generator):
    """Frames whose red channel encodes the frame index (so a wrong frame is detectable)."""
    frames = {}
    for k, (h, w) in cameras.items():
        a = np.zeros((T, h, w, 3), dtype=np.uint8)
        a[..., 0] = (np.arange(T) * 17 % 256)[:, None, None]
        a[..., 1] = 60 + 40 * e
        a[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, None, :]
        frames[k] = a
    state = rng.normal(size=(T, 4)).astype(np.float32)
    action = rng.normal(size=(T, 3)).astype(np.float32)
    return frames, state, action


CAMERAS = {"observation.images.corner": (32, 48), "observation.images.wrist": (16, 16)}


def make_lerobot_v3(root: Path, lengths=(9, 5, 7), codec: str | None = None, crf: int = 10):
    """A v3.0 dataset written by our writer; returns the episodes' (frames, state, action, task)."""
    from midtrain.data.lerobot import LeRobotDatasetWriter

    rng = np.random.default_rng(0)
    episodes = []
    with LeRobotDatasetWriter(root, fps=FPS, robot_type="sawyer", cameras=CAMERAS, state_dim=4, action_dim=3,
                              video_codec=codec, crf=crf) as w:
        for e, T in enumerate(lengths):
            frames, state, action = episode_arrays(e, T, CAMERAS, rng)
            task = f"task {e % 2}"
            w.add_episode(frames=frames, state=state, action=action, task=task)
            episodes.append((frames, state, action, task))
    return episodes


def encode_video(path: Path, frames: np.ndarray, codec: str = "libx264") -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "18", "g": "2"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_lerobot_v21(root: Path, lengths=(6, 4)):
    """A LeRobot v2.1 layout (per-episode parquet and H.264 videos, jsonl metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    cams = {"observation.images.top": (16, 24)}
    episodes, index = [], 0
    (root / "meta").mkdir(parents=True)
    for e, T in enumerate(lengths):
        frames, state, action = episode_arrays(e, T, cams, rng)
        path = root / f"data/chunk-000/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "observation.state": [list(map(float, s)) for s in state],
            "action": [list(map(float, a)) for a in action],
            "timestamp": pa.array(np.arange(T) / FPS, type=pa.float32()),
            "frame_index": np.arange(T), "episode_index": np.full(T, e), "index": index + np.arange(T),
            "task_index": np.full(T, e % 2),
        }), path)
        encode_video(root / f"videos/chunk-000/observation.images.top/episode_{e:06d}.mp4", frames["observation.images.top"])
        episodes.append((frames, state, action, f"v21 task {e % 2}"))
        index += T
    (root / "meta/episodes.jsonl").write_text(
        "".join(json.dumps({"episode_index": e, "tasks": [episodes[e][3]], "length": T}) + "\n" for e, T in enumerate(lengths)))
    (root / "meta/tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": f"v21 task {i}"}) + "\n" for i in range(2)))
    info = {
        "codebase_version": "v2.1", "robot_type": "aloha", "total_episodes": len(lengths), "total_frames": index,
        "total_tasks": 2, "total_videos": len(lengths), "total_chunks": 1, "chunks_size": 1000, "fps": FPS,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            "observation.images.top": {"dtype": "video", "shape": [16, 24, 3], "names": ["height", "width", "channels"]},
            "observation.state": {"dtype": "float32", "shape": [4], "names": None},
            "action": {"dtype": "float32", "shape": [3], "names": None},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    (root / "meta/info.json").write_text(json.dumps(info))
    return episodes
