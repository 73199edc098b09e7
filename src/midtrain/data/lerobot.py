"""LeRobot datasets, read and written natively (no ``lerobot`` dependency).

Reading (format v3.0, and v2.0/v2.1) turns every kept frame into one VLA catalog row:
camera image(s) as encoded bytes (one per camera, in ``cameras`` order), the
``instruction`` (the frame's task), ``state``, and an action chunk
``action[t : t+H]`` (H = ``chunk_size``) padded at the episode end by repeating the
last action, with ``action_mask`` False on the padded steps.

Layouts (as in huggingface/lerobot ``datasets/utils.py``)::

    v3.0  meta/info.json            codebase_version, fps, features, data_path, video_path
          meta/tasks.parquet        task_index (+ the task string as pandas index "task")
          meta/episodes/chunk-XXX/file-XXX.parquet
                                    episode_index, tasks, length, data/{chunk,file}_index,
                                    dataset_{from,to}_index, videos/<key>/{chunk_index,
                                    file_index, from_timestamp, to_timestamp}, stats/...
          data/chunk-XXX/file-XXX.parquet     frames of many episodes
          videos/<key>/chunk-XXX/file-XXX.mp4 many episodes concatenated; a frame is at
                                    from_timestamp + its timestamp
    v2.1  meta/episodes.jsonl, meta/tasks.jsonl,
          data/chunk-XXX/episode_XXXXXX.parquet, videos/chunk-XXX/<key>/episode_XXXXXX.mp4

Videos (AV1, H.264, ...) are decoded with PyAV sequentially per file - one pass, seeking
only across long gaps - and the frame nearest each timestamp is taken (it must lie
within half a frame period, else the episode is a bad sample).

Writing (``LeRobotDatasetWriter``) produces a v3.0 dataset that ``lerobot`` loads, so
simulated corpora are ordinary LeRobot datasets.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..runs import SampleError, StageError, write_json_atomic, write_parquet_atomic
from .images import encode_image
from .sources import Item, SampleReader, Selection, checked_image_ref

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_FILES_SIZE_MB = 100
VIDEO_FILES_SIZE_MB = 500
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
WRITER_DEFAULT_ENCODER = "libx264"  # what LeRobotDatasetWriter encodes with unless told otherwise
DEFAULT_CRF = {"libx264": 23, "libsvtav1": 30, "libx265": 28, "libx264rgb": 0}  # x264/x265 defaults; LeRobot's AV1
# setting; libx264rgb at crf 0 is lossless
# Pixel format each encoder is fed. yuv420p halves the chroma resolution (every decoder reads it); the RGB
# formats keep every pixel exactly (libx264rgb stores planar GBR, ffv1 its own lossless RGB coding).
DEFAULT_PIX_FMT = {"libx264rgb": "rgb24", "ffv1": "bgr0"}
STORED_PIX_FMT = {"libx264rgb": "gbrp"}  # what the stream holds (and decoders report), where not the input format
CODEC_NAMES = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264", "libx264rgb": "h264", "libx265": "hevc"}
NO_CRF = frozenset({"ffv1"})  # encoders without a quality setting (lossless only)
INDEX_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


# --------------------------------------------------------------------------- reading


@dataclass
class EpisodeRef:
    """Where one episode's frames live."""

    index: int
    length: int
    tasks: list[str]
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # camera -> (file, start time s)
    outside_root: Optional[str] = None  # a data/video path of meta/info.json that leaves the dataset root


def _matrix(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A list / fixed-size-list / scalar column -> ``[n, d]`` array without Python loops."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        return values.astype(dtype, copy=False).reshape(n, -1) if n else np.zeros((0, 0), dtype)
    return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(n, 1)


def action_chunks(actions: np.ndarray, frames: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """``actions[t : t+H]`` for each frame row ``t`` -> (``[n, H, A]`` chunks, ``[n, H]`` mask).

    Past the episode end the last action is repeated and the mask is False.
    """
    steps = frames[:, None] + np.arange(horizon)[None, :]
    mask = steps < len(actions)
    return actions[np.minimum(steps, len(actions) - 1)], mask


class VideoFrames:
    """Nearest-frame lookup in one video file, decoding forward (seeking only across gaps).

    ``frames_at`` takes non-decreasing times (seconds); a backward or long forward jump
    seeks to the keyframe before the target. Each returned frame lies within
    ``tolerance_s`` of its requested time or ``LookupError`` is raised.
    """

    SEEK_GAP_S = 1.0

    def __init__(self, path: Path, tolerance_s: float):
        import av
        import av.video.reformatter

        self.path = path
        self.tolerance_s = tolerance_s
        self.container = av.open(str(path))
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        # one reformatter (one cached swscale context) for all frames: ~5x faster than
        # frame.to_ndarray(format=...), which builds a new context per frame
        self._rgb = av.video.reformatter.VideoReformatter()
        self._restart()

    def _restart(self) -> None:
        self._decoder = self.container.decode(self.stream)
        self._prev = None
        self._cur = None
        self._ended = False

    def _advance(self) -> None:
        self._prev = self._cur
        try:
            self._cur = next(self._decoder)
        except StopIteration:
            self._cur, self._ended = None, True

    def _seek(self, t: float) -> None:
        self.container.seek(max(0, int(t / self.stream.time_base)), stream=self.stream, backward=True)
        self._restart()

    def frames_at(self, times: np.ndarray) -> list[np.ndarray]:
        out = []
        for t in np.asarray(times, dtype=np.float64):
            known = self._cur if self._cur is not None else self._prev
            if known is not None and (t < known.time - self.tolerance_s or t - known.time > self.SEEK_GAP_S):
                self._seek(t)
            while not self._ended and (self._cur is None or self._cur.time < t):
                self._advance()
            candidates = [f for f in (self._prev, self._cur) if f is not None]
            if not candidates:
                raise LookupError(f"no frame near t={t:.4f}s (empty video)")
            best = min(candidates, key=lambda f: abs(f.time - t))
            if abs(best.time - t) > self.tolerance_s:
                raise LookupError(f"no frame within {self.tolerance_s:.4f}s of t={t:.4f}s (nearest {best.time:.4f}s)")
            out.append(self._rgb.reformat(best, format="rgb24").to_ndarray())
        return out

    def close(self) -> None:
        self.container.close()


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise StageError(f"{path}:{lineno}: malformed JSON ({exc})") from None
    return out


def load_lerobot_info(root: Path) -> dict:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise StageError(f"{root}: not a LeRobot dataset (meta/info.json is missing)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: malformed JSON ({exc})") from None
    for key in ("codebase_version", "fps", "features"):
        if key not in info:
            raise StageError(f"{path}: missing required field {key!r}")
    return info


class LeRobotReader(SampleReader):
    """Frames of a LeRobot v3.0 / v2.x dataset directory as VLA catalog rows.

    Records are the kept frames (every ``frame_stride``-th of each episode) in episode
    order; the sample cap draws from them. Memory: the episode table, one data file and
    one decoded frame per camera.
    """

    def __init__(self, source, seed: int):
        super().__init__(source, seed)
        self.root = Path(source.path)
        self.info = load_lerobot_info(self.root)
        self.fps = float(self.info["fps"])
        self.features: dict = self.info["features"]
        version = str(self.info["codebase_version"])
        if version.startswith("v3"):
            episodes = self._episodes_v3()
        elif version.startswith("v2"):
            episodes = self._episodes_v2()
        else:
            raise StageError(f"{self.root}: unsupported LeRobot codebase_version {version!r} (v2.x and v3.x are read)")
        if source.episodes is not None:
            wanted = set(source.episodes)
            unknown = sorted(wanted - {e.index for e in episodes})
            if unknown:
                raise StageError(f"{self.root}: episodes: {unknown[:5]} not in the dataset")
            episodes = [e for e in episodes if e.index in wanted]
        self.episodes = episodes
        cams = [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]
        self.cameras = list(source.cameras) if source.cameras is not None else cams
        missing = [c for c in self.cameras if c not in cams]
        if missing:
            raise StageError(f"{self.root}: cameras: {missing} not found; camera features are {cams}")
        if source.action_key not in self.features:
            raise StageError(f"{self.root}: action_key: feature {source.action_key!r} not in meta/info.json features")
        if source.state_key in self.features:
            self.state_key: Optional[str] = source.state_key
        elif source.state_key == "observation.state":
            self.state_key = None  # datasets without proprioception: rows get state = null
        else:
            raise StageError(f"{self.root}: state_key: feature {source.state_key!r} not in meta/info.json features")
        stride = source.frame_stride
        self.kept = np.array([math.ceil(e.length / stride) for e in episodes], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.kept)]).astype(np.int64)
        self._data: tuple[Optional[Path], Optional[pa.Table]] = (None, None)
        self._videos: dict[str, VideoFrames] = {}

    # -- metadata ------------------------------------------------------------------------
    def _tasks_v3(self) -> dict[int, str]:
        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            raise StageError(f"{self.root}: meta/tasks.parquet is missing")
        table = pq.read_table(path)
        names = table.schema.names
        text_col = next((c for c in ("task", "__index_level_0__") if c in names), None)
        if text_col is None or "task_index" not in names:
            raise StageError(f"{path}: expected columns task_index and task, got {names}")
        return dict(zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist()))

    def _episodes_v3(self) -> list[EpisodeRef]:
        self.tasks = self._tasks_v3()
        files = sorted((self.root / "meta" / "episodes").glob("*/*.parquet"))
        if not files:
            raise StageError(f"{self.root}: no episode metadata (meta/episodes/chunk-*/file-*.parquet)")
        data_tpl = self.info.get("data_path", DATA_PATH)
        video_tpl = self.info.get("video_path") or VIDEO_PATH
        video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]
        out = []
        for file in files:
            schema = pq.read_schema(file)
            cols = [c for c in schema.names if not c.startswith("stats/")]
            for ep in pq.read_table(file, columns=cols).to_pylist():
                try:
                    data = self.root / data_tpl.format(chunk_index=ep["data/chunk_index"], file_index=ep["data/file_index"])
                    videos = {}
                    for key in video_keys:
                        path = video_tpl.format(
                            video_key=key, chunk_index=ep[f"videos/{key}/chunk_index"], file_index=ep[f"videos/{key}/file_index"]
                        )
                        videos[key] = (self.root / path, float(ep[f"videos/{key}/from_timestamp"]))
                    out.append(self._episode_ref(int(ep["episode_index"]), int(ep["length"]), list(ep.get("tasks") or []),
                                                 data, videos))  # fmt: skip
                except KeyError as exc:
                    raise StageError(f"{file}: episode row without required column {exc}") from None
        return sorted(out, key=lambda e: e.index)

    def _episodes_v2(self) -> list[EpisodeRef]:
        meta = self.root / "meta"
        for name in ("episodes.jsonl", "tasks.jsonl"):
            if not (meta / name).is_file():
                raise StageError(f"{self.root}: meta/{name} is missing (LeRobot v2.x layout)")
        self.tasks = {int(t["task_index"]): t["task"] for t in _read_jsonl(meta / "tasks.jsonl")}
        chunks = int(self.info.get("chunks_size", CHUNKS_SIZE))
        data_tpl = self.info.get("data_path", "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet")
        video_tpl = self.info.get("video_path") or "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]
        out = []
        for ep in _read_jsonl(meta / "episodes.jsonl"):
            e = int(ep["episode_index"])
            data = self.root / data_tpl.format(episode_chunk=e // chunks, episode_index=e)
            videos = {
                k: (self.root / video_tpl.format(episode_chunk=e // chunks, video_key=k, episode_index=e), 0.0)
                for k in video_keys
            }
            out.append(self._episode_ref(e, int(ep["length"]), list(ep.get("tasks") or []), data, videos))
        return sorted(out, key=lambda e: e.index)

    def _episode_ref(self, index: int, length: int, tasks: list[str], data: Path, videos: dict) -> EpisodeRef:
        """An episode whose files the ``data_path`` / ``video_path`` templates place; a file outside the
        dataset root (``../`` or an absolute template) makes the episode a sample error unless
        ``allow_outside_root``."""
        ref = EpisodeRef(index, length, tasks, data, videos)
        if not self.source.allow_outside_root:
            root = Path(os.path.normpath(self.root.absolute()))
            for path in [data, *(v[0] for v in videos.values())]:
                if root not in Path(os.path.normpath(path.absolute())).parents:
                    ref.outside_root = (f"{path} is outside the dataset root {root} (a data_path/video_path template of "
                                        "meta/info.json); set allow_outside_root: true to allow it")  # fmt: skip
                    break
        return ref

    # -- records -------------------------------------------------------------------------
    def count_records(self, need: bool) -> Optional[int]:
        return int(self.offsets[-1])

    def _data_table(self, path: Path, where: str) -> pa.Table:
        if self._data[0] != path:
            if not path.is_file():
                raise SampleError("missing data file", where, str(path))
            try:
                names = pq.read_schema(path).names
                wanted = ["episode_index", "frame_index", "timestamp", "task_index", self.source.action_key]
                wanted += [k for k in [self.state_key, *self.cameras] if k and self.features[k].get("dtype") != "video"]
                absent = [c for c in wanted if c not in names]
                if absent:
                    raise SampleError("missing required field", where, f"{path}: columns {absent}")
                table = pq.read_table(path, columns=wanted)
            except (pa.ArrowException, OSError) as exc:  # truncated or corrupt: every episode in it is skipped
                raise SampleError("undecodable data file", where, f"{path}: {exc}") from None
            self._data = (path, table)
        return self._data[1]

    def _video(self, camera: str, path: Path, where: str) -> VideoFrames:
        current = self._videos.get(camera)
        if current is not None and current.path == path:
            return current
        if current is not None:
            current.close()
            del self._videos[camera]
        if not path.is_file():
            raise SampleError("missing video file", where, f"{camera}: {path}")
        try:
            self._videos[camera] = VideoFrames(path, tolerance_s=0.5 / self.fps + 1e-4)
        except Exception as exc:  # PyAV raises several error types for unreadable containers
            raise SampleError("undecodable video", where, f"{camera}: {path}: {exc}") from None
        return self._videos[camera]

    def _episode_rows(self, ep: EpisodeRef, keep: np.ndarray) -> list[dict]:
        """Rows of the kept frame positions ``keep`` (indices into the episode's frames)."""
        where = f"{self.root} episode {ep.index}"
        if ep.outside_root:
            raise SampleError("path outside root", where, ep.outside_root)
        table = self._data_table(ep.data_file, where)
        sel = np.flatnonzero(table.column("episode_index").to_numpy() == ep.index)
        rows = table.take(pa.array(sel))
        rows = rows.take(pc.sort_indices(rows.column("frame_index")))
        if rows.num_rows != ep.length:
            raise SampleError(
                "episode length mismatch", where, f"{rows.num_rows} frames in {ep.data_file.name}, metadata says {ep.length}"
            )
        actions = _matrix(rows.column(self.source.action_key))
        chunk, mask = action_chunks(actions, keep, self.source.chunk_size)
        state = _matrix(rows.column(self.state_key))[keep] if self.state_key else None
        frame_ids = rows.column("frame_index").to_numpy()[keep]
        times = _matrix(rows.column("timestamp"), np.float64)[keep, 0]
        task_idx = rows.column("task_index").to_numpy()[keep]
        unknown = sorted(set(task_idx.tolist()) - set(self.tasks))
        if unknown:
            raise SampleError("unknown task index", where, f"task_index {unknown[:3]} not in the tasks table")

        images: list[list[dict]] = [[] for _ in keep]
        for cam in self.cameras:
            if self.features[cam].get("dtype") == "video":
                file, start = ep.videos[cam]
                try:
                    frames = self._video(cam, file, where).frames_at(start + times)
                except LookupError as exc:
                    raise SampleError("video frame missing", where, f"{cam}: {file}: {exc}") from None
                except SampleError:
                    raise
                except Exception as exc:
                    raise SampleError("undecodable video", where, f"{cam}: {file}: {exc}") from None
                fmt = "JPEG" if self.source.image_format == "jpeg" else "PNG"
                for i, frame in enumerate(frames):
                    images[i].append({"path": None, "bytes": encode_image(frame, fmt)})
            else:
                values = rows.column(cam).take(pa.array(keep)).to_pylist()
                for i, v in enumerate(values):
                    ref = checked_image_ref(v, self.root, f"{where} frame {frame_ids[i]}", None, self.source, verify=False)
                    images[i].append(ref)
        out = []
        for i in range(len(keep)):
            f = int(frame_ids[i])
            out.append(
                {
                    "id": f"{ep.index}/{f}",
                    "image_refs": images[i],
                    "instruction": self.tasks[int(task_idx[i])],
                    "episode": ep.index,
                    "frame": f,
                    "state": None if state is None else state[i].tolist(),
                    "action": chunk[i].tolist(),
                    "action_mask": mask[i].tolist(),
                    "origin": f"{where} frame {f}",
                }
            )
        return out

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        stride = self.source.frame_stride
        try:
            for e, ep in enumerate(self.episodes):
                lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
                wanted = np.flatnonzero(selection.mask(lo, hi))
                if not len(wanted):
                    continue
                try:
                    rows = self._episode_rows(ep, wanted * stride)
                except (pa.ArrowException, ValueError, TypeError, IndexError) as exc:  # values of the wrong type/shape
                    detail = f"{type(exc).__name__}: {exc}; {len(wanted)} frame(s) of this episode skipped"
                    err = SampleError("malformed episode data", f"{self.root} episode {ep.index}", detail)
                    err.samples = len(wanted)
                    yield lo + int(wanted[-1]), err
                    continue
                except SampleError as err:
                    err.detail = f"{err.detail}; {len(wanted)} frame(s) of this episode skipped".lstrip("; ")
                    err.samples = len(wanted)  # the frames count as read and skipped, not one sample
                    yield lo + int(wanted[-1]), err
                    continue
                for k, row in zip(wanted, rows):
                    yield lo + int(k), row
        finally:
            for v in self._videos.values():
                v.close()
            self._videos.clear()
            self._data = (None, None)


# --------------------------------------------------------------------------- writing


def _episode_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """min/max/mean/std/count over axis 0 of ``[T, ...]`` values (LeRobot's per-episode stats)."""
    v = values.astype(np.float64)
    return {"min": v.min(0), "max": v.max(0), "mean": v.mean(0), "std": v.std(0), "count": np.array([len(v)])}


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of uint8 ``[T, H, W, 3]`` frames scaled to [0, 1], shaped ``[3, 1, 1]`` like LeRobot.

    Like LeRobot's ``compute_stats``, a sample suffices: at most 16 evenly spaced frames,
    spatially strided to about 150 px on the long side.
    """
    idx = np.unique(np.linspace(0, len(frames) - 1, num=min(16, len(frames))).round().astype(int))
    step = max(1, max(frames.shape[1:3]) // 150)
    v = frames[idx, ::step, ::step].reshape(-1, 3).astype(np.float32) / 255.0
    shape = (3, 1, 1)
    return {
        "min": v.min(0).reshape(shape), "max": v.max(0).reshape(shape), "mean": v.mean(0).reshape(shape),
        "std": v.std(0).reshape(shape), "count": np.array([len(frames)]),
    }  # fmt: skip


def aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-episode stats: count-weighted mean, pooled variance, elementwise min/max."""
    counts = np.array([s["count"][0] for s in per_episode], dtype=np.float64)
    total = counts.sum()
    shape = (-1,) + (1,) * np.ndim(per_episode[0]["mean"])
    w = (counts / total).reshape(shape)
    means = np.stack([s["mean"] for s in per_episode])
    mean = (w * means).sum(0)
    var = (w * (np.stack([s["std"] for s in per_episode]) ** 2 + (means - mean) ** 2)).sum(0)
    return {
        "min": np.min([s["min"] for s in per_episode], axis=0), "max": np.max([s["max"] for s in per_episode], axis=0),
        "mean": mean, "std": np.sqrt(var), "count": np.array([int(total)]),
    }  # fmt: skip


def _vector_column(values: np.ndarray) -> pa.Array:
    """``[T, d]`` float32 -> a fixed-size list column, or a scalar column when d == 1 (LeRobot's layout)."""
    if values.shape[1] == 1:
        return pa.array(values[:, 0])
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class _RollingFile:
    """A file written under a hidden temporary name and renamed into place when finished."""

    def __init__(self, final: Path):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = final.with_name(f".{final.name}.tmp")

    def finish(self) -> None:
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


class _VideoStream:
    """One camera's MP4 files: episodes appended frame by frame, rolled over by size."""

    def __init__(self, writer: "LeRobotDatasetWriter", key: str, height: int, width: int):
        self.w, self.key, self.height, self.width = writer, key, height, width
        self.chunk_index, self.file_index = 0, 0
        self.file: Optional[_RollingFile] = None
        self.frames_in_file = 0

    def _open(self) -> None:
        import av

        path = self.w.root / VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk_index, file_index=self.file_index)
        self.file = _RollingFile(path)
        self.container = av.open(str(self.file.tmp), mode="w", format="mp4")
        stream = self.container.add_stream(self.w.video_codec, rate=Fraction(self.w.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = self.width, self.height, self.w.pix_fmt
        stream.time_base = Fraction(1, 1) / Fraction(self.w.fps).limit_denominator(1001)
        stream.options = {"g": str(self.w.gop)} | ({} if self.w.crf is None else {"crf": str(self.w.crf)})
        self.stream = stream
        self.frames_in_file = 0

    def append(self, frames: np.ndarray) -> tuple[int, int, float, float]:
        """Encode ``[T, H, W, 3]`` uint8 frames; returns (chunk, file, from_s, to_s) of the episode."""
        import av

        if self.file is None:
            self._open()
        start = self.frames_in_file
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.frames_in_file
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.frames_in_file += 1
        location = (self.chunk_index, self.file_index, start / self.w.fps, self.frames_in_file / self.w.fps)
        if self.file.tmp.exists() and self.file.tmp.stat().st_size >= self.w.video_file_mb * 2**20:
            self.close()
            self.file_index += 1
            if self.file_index >= CHUNKS_SIZE:
                self.chunk_index, self.file_index = self.chunk_index + 1, 0
        return location

    def close(self) -> None:
        if self.file is None:
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self.file.finish()
        self.file = None

    def discard(self) -> None:
        if self.file is not None:
            # no encoder flush here: after a failed mux SVT-AV1 can block forever in its flush
            with contextlib.suppress(Exception):
                self.container.close()
            self.file.discard()
            self.file = None


def encoder_problem(encoder: str, pix_fmt: str) -> Optional[tuple[str, str]]:
    """Why PyAV cannot encode ``pix_fmt`` frames with ``encoder`` here: ``("encoder" | "pix_fmt",
    message)``, or None when it can. Shared by the writer and the evaluation's codec round trip."""
    import av

    try:
        codec = av.codec.Codec(encoder, "w")
    except Exception:
        return "encoder", f"PyAV has no encoder {encoder!r} here (try libx264 or libsvtav1)"
    supported = {f.name for f in codec.video_formats or ()}
    if supported and pix_fmt not in supported:
        return "pix_fmt", f"{encoder} cannot encode {pix_fmt!r}; it takes {', '.join(sorted(supported))}"
    return None


class LeRobotDatasetWriter:
    """Write a LeRobot v3.0 dataset, one episode at a time.

    Usage::

        with LeRobotDatasetWriter(root, fps=10, robot_type="sawyer",
                                  cameras={"observation.images.corner": (224, 224)},
                                  state_dim=39, action_dim=4) as w:
            w.add_episode(frames={"observation.images.corner": frames},  # uint8 [T, H, W, 3]
                          state=state, action=action,                     # float32 [T, S], [T, A]
                          task="pick up the red block")

    Frames are encoded to MP4, many episodes per file, with ``gop`` 2 as LeRobot's encoder
    does for fast random access. The default codec is H.264 (``libx264``, crf 23, yuv420p):
    every decoder (torchcodec, torchvision, PyAV, browsers) reads it, and here it encodes
    faster than AV1. ``video_codec="libsvtav1"`` gives LeRobot's own default, AV1 at crf 30
    (smaller files; in a stress run SVT-AV1 once failed a mux under heavy CPU contention, so
    it is opt-in). Both are lossy: at 128 px crf 23 is off by ~4/255 per pixel on average.
    ``video_codec="libx264rgb"`` (crf 0) is lossless H.264 in RGB: decoded frames equal the
    input bit for bit, for ~10x the size, and FFmpeg-based decoders (PyAV, torchcodec,
    torchvision) read it (browsers and hardware decoders do not: High 4:4:4 profile).
    ``pix_fmt`` overrides the encoder's input format (e.g. ``yuv444p`` with libx264).

    ``extra_features``: further per-frame float32 vectors, key -> entry names (e.g.
    ``{"observation.ee_pos": ["x", "y", "z"]}``), passed to ``add_episode(extra=...)`` as
    ``[T, d]`` arrays; they are Parquet columns with ``info.json`` features and stats like
    ``observation.state``. ``meta``: further JSON documents written under ``meta/`` (file
    name -> object), e.g. ``{"calibration.json": ...}``.

    ``meta/info.json``, ``tasks.parquet``, episode metadata with per-episode
    stats, and ``meta/stats.json`` are written when the ``with`` block ends; data and
    video files are renamed into place when complete. If the block raises, temporary
    files are removed and no ``info.json`` is written, so a half-written dataset is never
    mistaken for a complete one.
    """

    def __init__(
        self,
        root: Path | str,
        fps: float,
        robot_type: Optional[str],
        cameras: dict[str, tuple[int, int]],
        state_dim: int,
        action_dim: int,
        state_names: Optional[list[str]] = None,
        action_names: Optional[list[str]] = None,
        video_codec: Optional[str] = None,
        crf: Optional[int] = None,
        gop: int = 2,
        data_file_mb: int = DATA_FILES_SIZE_MB,
        video_file_mb: int = VIDEO_FILES_SIZE_MB,
        pix_fmt: Optional[str] = None,
        extra_features: Optional[dict[str, list[str]]] = None,
        meta: Optional[dict[str, Any]] = None,
    ):
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root}: already exists and is not empty; choose a new dataset folder")
        video_codec = video_codec or WRITER_DEFAULT_ENCODER
        pix_fmt = pix_fmt or DEFAULT_PIX_FMT.get(video_codec, "yuv420p")
        for key, (h, w) in cameras.items():
            if h < 2 or w < 2 or (pix_fmt == "yuv420p" and (h % 2 or w % 2)):
                raise ValueError(f"cameras[{key!r}]: height and width must be even (yuv420p video), got {(h, w)}")
        for name, names, dim in (("state_names", state_names, state_dim), ("action_names", action_names, action_dim)):
            if names is not None and len(names) != dim:
                raise ValueError(f"{name}: {len(names)} names for dimension {dim}")
        reserved = set(INDEX_FEATURES) | set(cameras) | {"observation.state", "action"}
        for key, names in (extra_features or {}).items():
            if key in reserved or not names:
                raise ValueError(f"extra_features[{key!r}]: a new feature key with at least one entry name is needed")
        crf = None if video_codec in NO_CRF else crf if crf is not None else DEFAULT_CRF.get(video_codec, 23)
        problem = encoder_problem(video_codec, pix_fmt)
        if problem:
            raise ValueError(f"{'video_codec' if problem[0] == 'encoder' else 'pix_fmt'}: {problem[1]}")
        os.environ.setdefault("SVT_LOG", "2")  # SVT-AV1 prints its config banner at info level otherwise
        self.fps, self.robot_type, self.cameras = fps, robot_type, dict(cameras)
        self.state_dim, self.action_dim = state_dim, action_dim
        self.state_names, self.action_names = state_names, action_names
        self.video_codec, self.crf, self.gop, self.pix_fmt = video_codec, crf, gop, pix_fmt
        self.extra_features = {k: list(v) for k, v in (extra_features or {}).items()}
        self.meta = dict(meta or {})
        self.data_file_mb, self.video_file_mb = data_file_mb, video_file_mb
        self.root.mkdir(parents=True, exist_ok=True)
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.stats: list[dict[str, dict[str, np.ndarray]]] = []
        self.total_frames = 0
        self._videos = {k: _VideoStream(self, k, h, w) for k, (h, w) in self.cameras.items()}
        self._data_file: Optional[_RollingFile] = None
        self._data_writer: Optional[pq.ParquetWriter] = None
        self._data_loc = (0, 0)
        self._closed = False

    # -- schema ----------------------------------------------------------------------------
    def features(self) -> dict[str, dict]:
        feats: dict[str, dict] = {}
        codec_name = CODEC_NAMES.get(self.video_codec, self.video_codec)
        pix_fmt = STORED_PIX_FMT.get(self.video_codec, self.pix_fmt)
        for key, (h, w) in self.cameras.items():
            feats[key] = {
                "dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
                "info": {"video.height": h, "video.width": w, "video.codec": codec_name, "video.pix_fmt": pix_fmt,
                         "video.is_depth_map": False, "video.fps": self.fps, "video.channels": 3, "has_audio": False},
            }  # fmt: skip
        feats["observation.state"] = {"dtype": "float32", "shape": [self.state_dim], "names": self.state_names}
        feats["action"] = {"dtype": "float32", "shape": [self.action_dim], "names": self.action_names}
        for key, names in self.extra_features.items():
            feats[key] = {"dtype": "float32", "shape": [len(names)], "names": names}
        return {**feats, **INDEX_FEATURES}

    def _data_schema(self) -> pa.Schema:
        from datasets import Features, List, Value

        def vector(d: int):  # LeRobot stores shape-[1] features as scalars (datasets.Value), longer ones as lists
            return Value("float32") if d == 1 else List(Value("float32"), length=d)

        feats = Features(
            {
                "observation.state": vector(self.state_dim),
                "action": vector(self.action_dim),
                **{key: vector(len(names)) for key, names in self.extra_features.items()},
                "timestamp": Value("float32"), "frame_index": Value("int64"), "episode_index": Value("int64"),
                "index": Value("int64"), "task_index": Value("int64"),
            }
        )  # fmt: skip
        return feats.arrow_schema

    # -- episodes --------------------------------------------------------------------------
    def add_episode(
        self, frames: dict[str, np.ndarray], state: np.ndarray, action: np.ndarray, task: str,
        extra: Optional[dict[str, np.ndarray]] = None,
    ) -> int:  # fmt: skip
        """Append one episode; returns its episode index. Arrays are validated, not coerced silently;
        ``extra`` holds a ``[T, d]`` array for every declared extra feature."""
        if self._closed:
            raise RuntimeError(f"{self.root}: writer is closed")
        state = np.asarray(state, dtype=np.float32)
        action = np.asarray(action, dtype=np.float32)
        T = len(action)
        if T < 1:
            raise ValueError("add_episode: an episode needs at least one frame")
        if action.shape != (T, self.action_dim):
            raise ValueError(f"add_episode: action shape {action.shape}, expected ({T}, {self.action_dim})")
        if state.shape != (T, self.state_dim):
            raise ValueError(f"add_episode: state shape {state.shape}, expected ({T}, {self.state_dim})")
        if set(frames) != set(self.cameras):
            raise ValueError(f"add_episode: frames for {sorted(frames)}, expected cameras {sorted(self.cameras)}")
        for key, (h, w) in self.cameras.items():
            arr = frames[key]
            if arr.dtype != np.uint8 or arr.shape != (T, h, w, 3):
                raise ValueError(f"add_episode: frames[{key!r}] is {arr.dtype} {arr.shape}, expected uint8 {(T, h, w, 3)}")
        if not isinstance(task, str) or not task.strip():
            raise ValueError("add_episode: task must be a non-empty string")
        extra = dict(extra or {})
        if set(extra) != set(self.extra_features):
            raise ValueError(f"add_episode: extra features {sorted(extra)}, expected {sorted(self.extra_features)}")
        for key, names in self.extra_features.items():
            extra[key] = np.asarray(extra[key], dtype=np.float32)
            if extra[key].shape != (T, len(names)):
                raise ValueError(f"add_episode: extra[{key!r}] shape {extra[key].shape}, expected ({T}, {len(names)})")

        ep_index = len(self.episodes)
        task_index = self.tasks.setdefault(task, len(self.tasks))
        meta: dict[str, Any] = {"episode_index": ep_index, "tasks": [task], "length": T}
        for key, video in self._videos.items():
            chunk, file, t0, t1 = video.append(frames[key])
            meta.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                         f"videos/{key}/from_timestamp": t0, f"videos/{key}/to_timestamp": t1})  # fmt: skip
        chunk, file = self._write_data(state, action, ep_index, task_index, extra)
        meta.update({"data/chunk_index": chunk, "data/file_index": file,
                     "dataset_from_index": self.total_frames, "dataset_to_index": self.total_frames + T})  # fmt: skip
        stats = {"observation.state": _episode_stats(state), "action": _episode_stats(action)}
        stats.update({key: _episode_stats(values) for key, values in extra.items()})
        stats.update({k: _image_stats(frames[k]) for k in self.cameras})
        frame_index = np.arange(T)
        for name, col in (("timestamp", frame_index / self.fps), ("frame_index", frame_index),
                          ("episode_index", np.full(T, ep_index)), ("index", self.total_frames + frame_index),
                          ("task_index", np.full(T, task_index))):  # fmt: skip
            stats[name] = _episode_stats(np.asarray(col, dtype=np.float64)[:, None])
        for key, st in stats.items():
            for stat, value in st.items():
                meta[f"stats/{key}/{stat}"] = value.tolist()
        self.stats.append(stats)
        self.episodes.append(meta)
        self.total_frames += T
        return ep_index

    def _write_data(
        self, state: np.ndarray, action: np.ndarray, ep_index: int, task_index: int, extra: dict[str, np.ndarray]
    ) -> tuple[int, int]:  # fmt: skip
        T = len(action)
        schema = self._data_schema()
        frame_index = np.arange(T, dtype=np.int64)
        table = pa.table(
            {
                "observation.state": _vector_column(state),
                "action": _vector_column(action),
                **{key: _vector_column(v) for key, v in extra.items()},
                "timestamp": pa.array((frame_index / self.fps).astype(np.float32)),
                "frame_index": pa.array(frame_index),
                "episode_index": pa.array(np.full(T, ep_index, dtype=np.int64)),
                "index": pa.array(self.total_frames + frame_index),
                "task_index": pa.array(np.full(T, task_index, dtype=np.int64)),
            }
        ).cast(schema)
        if self._data_writer is None:
            chunk, file = self._data_loc
            self._data_file = _RollingFile(self.root / DATA_PATH.format(chunk_index=chunk, file_index=file))
            self._data_writer = pq.ParquetWriter(self._data_file.tmp, schema)
        self._data_writer.write_table(table)
        location = self._data_loc
        if self._data_file.tmp.stat().st_size >= self.data_file_mb * 2**20:
            self._close_data()
            chunk, file = self._data_loc
            self._data_loc = (chunk + 1, 0) if file + 1 >= CHUNKS_SIZE else (chunk, file + 1)
        return location

    def _close_data(self) -> None:
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_file.finish()
            self._data_writer, self._data_file = None, None

    # -- finishing -------------------------------------------------------------------------
    def close(self) -> None:
        """Finish every file and write the metadata (``info.json`` last)."""
        if self._closed:
            return
        self._closed = True
        for video in self._videos.values():
            video.close()
        self._close_data()
        if self.episodes:
            write_parquet_atomic(self.root / EPISODES_PATH.format(chunk_index=0, file_index=0), self._episodes_table())
        self._write_tasks()
        stats = {}
        if self.stats:
            for key in self.stats[0]:
                agg = aggregate_stats([s[key] for s in self.stats])
                stats[key] = {k: v.tolist() for k, v in agg.items()}
        write_json_atomic(self.root / "meta" / "stats.json", stats)
        for name, doc in self.meta.items():
            write_json_atomic(self.root / "meta" / name, doc)
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": len(self.episodes), "total_frames": self.total_frames, "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": self.data_file_mb,
            "video_files_size_in_mb": self.video_file_mb, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"} if self.episodes else {},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH if self.cameras else None,
            "features": self.features(),
        }  # fmt: skip
        write_json_atomic(self.root / "meta" / "info.json", info)

    def _episodes_table(self) -> pa.Table:
        table = pa.Table.from_pylist(self.episodes)
        n = table.num_rows
        table = table.append_column("meta/episodes/chunk_index", pa.array(np.zeros(n, dtype=np.int64)))
        return table.append_column("meta/episodes/file_index", pa.array(np.zeros(n, dtype=np.int64)))

    def _write_tasks(self) -> None:
        """``tasks.parquet`` with the task string as the pandas index named ``task`` (LeRobot's layout)."""
        import pandas as pd

        tasks = pd.DataFrame(
            {"task_index": np.arange(len(self.tasks), dtype=np.int64)}, index=pd.Index(list(self.tasks), name="task")
        )
        write_parquet_atomic(self.root / "meta" / "tasks.parquet", pa.Table.from_pandas(tasks))

    def abort(self) -> None:
        """Remove temporary files; the folder is left without ``info.json`` (not a dataset)."""
        self._closed = True
        for video in self._videos.values():
            video.discard()
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_file.discard()
            self._data_writer, self._data_file = None, None

    def __enter__(self) -> "LeRobotDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
