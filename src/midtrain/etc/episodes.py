"""A LeRobot dataset as ETC generators see it: per episode, the quantities they ask about.

Quantities (``EpisodeFields.fields``; T = episode length, K = object slots)::

    action            [T, A]     always (a LeRobot dataset has actions)
    ee_pos            [T, 3]     end-effector position, metres (world frame of the calibration)
    gripper_opening   [T]        1 = open, 0 = closed
    gripper_command   [T]        +1 closes, -1 opens (sign-normalised with gripper_close_positive)
    contact           [T]        bool: the gripper touches an object
    objects           [T, K, 3]  task object positions, metres
    goal              [T, 3]     task goal position, metres
    intrinsics        [T, 4]     (fx, fy, cx, cy), per frame or the static calibration repeated
    extrinsics        [T, 3, 4]  world -> camera [R|t] (midtrain.data.calibration)

Each comes from a configured feature (``EtcConfig.fields``) or from the calibration file; one
the dataset lacks is recorded in ``missing`` with the reason, and the generators needing it are
skipped. Object names come from ``meta/objects.json`` (``sim collect`` writes it) or a supplied
file; without one, objects are called "object 1", "object 2".
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.calibration import CALIBRATION_FILE, CameraCalibration, load_calibration
from ..data.lerobot import EpisodeRef, LeRobotReader, VideoFrames, _matrix
from ..data.sources import DatasetSource
from ..runs import SampleError, StageError
from .config import EtcConfig, parse_field_spec
from .fields import EpisodeFields, TaskNames

OBJECTS_FILE = "meta/objects.json"
QUANTITY_WIDTH = {"ee_pos": 3, "gripper_opening": 1, "gripper_command": 1, "contact": 1, "goal": 3}


class EtcDataset:
    """Reads episodes and writes their frames; knows which quantities the dataset has."""

    def __init__(self, config: EtcConfig, root: Path):
        self.config, self.root = config, Path(root)
        source = DatasetSource(
            name="etc", kind="vla", format="lerobot", path=self.root, cameras=[config.camera] if config.camera else None,
            episodes=config.episodes,
        )  # fmt: skip
        self.reader = LeRobotReader(source, seed=config.seed)
        if not self.reader.cameras:
            raise StageError(f"{self.root}: no camera (video or image) feature in meta/info.json; ETC needs frames")
        self.camera = self.reader.cameras[0]
        feature = self.reader.features[self.camera]
        self.camera_dtype = feature["dtype"]
        shape = feature.get("shape") or []
        if len(shape) != 3:
            raise StageError(f"{self.root}: meta/info.json features.{self.camera}.shape: expected [H, W, C], got {shape}")
        names = feature.get("names") or []
        self.height, self.width = (shape[1], shape[0]) if list(names[:2]) == ["width", "height"] else (shape[0], shape[1])
        self.missing: dict[str, str] = {}
        self.specs: dict[str, tuple[str, Optional[slice]]] = {}
        for quantity in ("ee_pos", "gripper_opening", "gripper_command", "contact", "objects", "goal"):
            self._resolve(quantity, getattr(config.fields, quantity))
        self.calibration = self._load_calibration()
        self.task_names = self._load_names()
        self._table: tuple[Optional[Path], Optional[pa.Table]] = (None, None)
        self._video: Optional[VideoFrames] = None

    # -- what the dataset has ----------------------------------------------------------------------
    def _resolve(self, quantity: str, spec: str) -> None:
        if not spec:
            self.missing[quantity] = f"fields.{quantity} is empty (disabled)"
            return
        key, part = parse_field_spec(spec, f"fields.{quantity}")
        feature = self.reader.features.get(key)
        if feature is None:
            self.missing[quantity] = f"feature {key!r} (fields.{quantity}) not in {self.root}/meta/info.json"
            return
        shape = feature.get("shape") or [1]
        width = len(range(*part.indices(int(np.prod(shape))))) if part is not None else int(np.prod(shape))
        want = QUANTITY_WIDTH.get(quantity)
        if (want is not None and width != want) or (quantity == "objects" and (width == 0 or width % 3)):
            expected = "a multiple of 3" if quantity == "objects" else str(want)
            raise StageError(
                f"{self.root}: fields.{quantity} = {spec!r} selects {width} entries of feature {key!r} (shape {shape}); "
                f"expected {expected} - set fields.{quantity} to the right feature or entries"
            )
        self.specs[quantity] = (key, part)

    def _load_calibration(self) -> Optional[CameraCalibration]:
        path = self.config.calibration or self.root / CALIBRATION_FILE
        if not Path(path).is_file():
            where = "calibration" if self.config.calibration else CALIBRATION_FILE
            self.missing["camera"] = f"no camera calibration ({where} not found at {path})"
            return None
        cameras = load_calibration(Path(path))
        cam = cameras.get(self.camera)
        if cam is None:
            self.missing["camera"] = f"{path} has no calibration for camera {self.camera!r} (it has {sorted(cameras)})"
            return None
        for kind in ("intrinsics", "extrinsics"):
            feat = getattr(cam, f"{kind}_feature")
            if feat and feat not in self.reader.features:
                setattr(cam, f"{kind}_feature", None)  # a per-frame feature this dataset lacks: use the static value
            if getattr(cam, f"{kind}_feature") is None and getattr(cam, kind) is None:
                self.missing["camera"] = f"{path}: camera {self.camera!r} has neither static {kind} nor a per-frame feature"
                return None
        if (cam.width, cam.height) != (self.width, self.height):
            raise StageError(
                f"{path}: camera {self.camera!r} is calibrated for {cam.width}x{cam.height} but its frames are "
                f"{self.width}x{self.height}; supply the calibration of the recorded image size"
            )
        return cam

    def _load_names(self) -> dict[str, TaskNames]:
        path = self.config.object_names or self.root / OBJECTS_FILE
        if not Path(path).is_file():
            if self.config.object_names:
                raise StageError(f"object_names: {path} not found")
            return {}
        try:
            doc = json.loads(Path(path).read_text())
            tasks = doc["tasks"]
            return {
                instr: TaskNames(list(t.get("objects") or []), t.get("goal"), t.get("verb") or "reach", t.get("target") or "object")
                for instr, t in tasks.items()
            }  # fmt: skip
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise StageError(
                f"{path}: expected {{\"tasks\": {{instruction: {{\"objects\": [...], \"goal\": ..., \"verb\": ...}}}}}} "
                f"({type(exc).__name__}: {exc})"
            ) from None

    def has(self, quantity: str) -> bool:
        return quantity in ("action", "frames") or (quantity not in self.missing)

    @property
    def episodes(self) -> list[EpisodeRef]:
        return self.reader.episodes

    # -- episodes ----------------------------------------------------------------------------------
    def _data_table(self, path: Path, where: str) -> pa.Table:
        if self._table[0] != path:
            if not path.is_file():
                raise SampleError("missing data file", where, str(path))
            names = pq.read_schema(path).names
            wanted = ["episode_index", "frame_index", "timestamp", "task_index", self.reader.source.action_key]
            wanted += sorted({key for key, _ in self.specs.values()})
            if self.calibration is not None:
                wanted += [f for f in (self.calibration.intrinsics_feature, self.calibration.extrinsics_feature) if f]
            if self.camera_dtype != "video":
                wanted.append(self.camera)
            absent = [c for c in dict.fromkeys(wanted) if c not in names]
            if absent:
                raise SampleError("missing required field", where, f"{path}: columns {absent}")
            self._table = (path, pq.read_table(path, columns=list(dict.fromkeys(wanted))))
        return self._table[1]

    def episode(self, ref: EpisodeRef) -> EpisodeFields:
        """The episode's quantities; a malformed episode raises SampleError naming it."""
        where = f"{self.root} episode {ref.index}"
        table = self._data_table(ref.data_file, where)
        rows = table.take(pa.array(np.flatnonzero(table.column("episode_index").to_numpy() == ref.index)))
        rows = rows.take(pc.sort_indices(rows.column("frame_index")))
        if rows.num_rows != ref.length:
            raise SampleError("episode length mismatch", where, f"{rows.num_rows} frames in {ref.data_file.name}, metadata says {ref.length}")
        T = rows.num_rows
        task_idx = rows.column("task_index").to_numpy()
        if int(task_idx[0]) not in self.reader.tasks:
            raise SampleError("unknown task index", where, f"task_index {int(task_idx[0])} not in the tasks table")
        instruction = self.reader.tasks[int(task_idx[0])]
        fields: dict[str, np.ndarray] = {"action": _matrix(rows.column(self.reader.source.action_key))}
        for quantity, (key, part) in self.specs.items():
            values = _matrix(rows.column(key), np.float64)
            values = values[:, part] if part is not None else values
            if not np.isfinite(values).all():
                raise SampleError("non-finite values", where, f"{key} ({quantity}) has NaN or inf")
            fields[quantity] = values
        for quantity in ("gripper_opening", "gripper_command", "contact"):
            if quantity in fields:
                fields[quantity] = fields[quantity][:, 0]
        if "gripper_command" in fields and not self.config.gripper_close_positive:
            fields["gripper_command"] = -fields["gripper_command"]
        if "contact" in fields:
            fields["contact"] = fields["contact"] > 0.5
        if "objects" in fields:
            fields["objects"] = fields["objects"].reshape(T, -1, 3)
        if self.calibration is not None:
            cal = self.calibration
            fields["intrinsics"] = (
                _matrix(rows.column(cal.intrinsics_feature), np.float64) if cal.intrinsics_feature
                else np.broadcast_to(cal.intrinsics, (T, 4))
            )  # fmt: skip
            fields["extrinsics"] = (
                _matrix(rows.column(cal.extrinsics_feature), np.float64).reshape(T, 3, 4) if cal.extrinsics_feature
                else np.broadcast_to(cal.extrinsics, (T, 3, 4))
            )  # fmt: skip
        names = self.task_names.get(instruction)
        if names is None:
            k = fields["objects"].shape[1] if "objects" in fields else 0
            names = TaskNames([f"object {i + 1}" for i in range(k)], "goal position" if "goal" in fields else None)
        images = rows.column(self.camera).to_pylist() if self.camera_dtype != "video" else None
        return EpisodeFields(
            ref.index, instruction, rows.column("frame_index").to_numpy(), _matrix(rows.column("timestamp"), np.float64)[:, 0],
            fields, names, images,
        )  # fmt: skip

    # -- frames ------------------------------------------------------------------------------------
    def write_frames(self, ref: EpisodeRef, ep: EpisodeFields, positions: list[int], out_dir: Path) -> dict[int, str]:
        """Write each frame (row position) once under ``out_dir``; returns position -> path relative
        to ``out_dir``'s parent. Video frames are decoded (one forward pass) and written as PNG/JPEG;
        image features are copied byte for byte, or referenced by their absolute path."""
        positions = sorted(set(positions))
        where = f"{self.root} episode {ref.index}"
        rel = f"{out_dir.name}/{ref.index:06d}"
        folder = out_dir / f"{ref.index:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        out: dict[int, str] = {}
        if self.camera_dtype == "video":
            path, start = ref.videos[self.camera]
            frames = self._frames(path, start + ep.times[positions], where)
            ext, fmt = ("png", "PNG") if self.config.image_format == "png" else ("jpg", "JPEG")
            from PIL import Image

            for pos, frame in zip(positions, frames):
                name = f"{int(ep.frame_ids[pos]):06d}.{ext}"
                with _renamed_into_place(folder / name) as tmp:
                    Image.fromarray(frame).save(tmp, format=fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 95}))
                out[pos] = f"{rel}/{name}"
            return out
        for pos in positions:
            cell = ep.images[pos] if ep.images is not None else None
            if isinstance(cell, dict) and cell.get("bytes"):
                data = cell["bytes"]
                ext = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg" if data[:2] == b"\xff\xd8" else "img"
                name = f"{int(ep.frame_ids[pos]):06d}.{ext}"
                with _renamed_into_place(folder / name) as tmp:
                    tmp.write_bytes(data)
                out[pos] = f"{rel}/{name}"
            elif isinstance(cell, dict) and cell.get("path"):
                image = Path(cell["path"])
                image = image if image.is_absolute() else self.root / image
                if not image.is_file():
                    raise SampleError("missing image file", f"{where} frame {int(ep.frame_ids[pos])}", str(image))
                out[pos] = str(image.resolve())
            else:
                raise SampleError("empty image reference", f"{where} frame {int(ep.frame_ids[pos])}", f"{self.camera}: {cell!r:.60}")
        return out

    def _frames(self, path: Path, times: np.ndarray, where: str) -> list[np.ndarray]:
        if self._video is None or self._video.path != path:
            self.close()
            if not path.is_file():
                raise SampleError("missing video file", where, f"{self.camera}: {path}")
            try:
                self._video = VideoFrames(path, tolerance_s=0.5 / self.reader.fps + 1e-4)
            except Exception as exc:  # PyAV raises several error types for unreadable containers
                raise SampleError("undecodable video", where, f"{self.camera}: {path}: {exc}") from None
        try:
            return self._video.frames_at(times)
        except LookupError as exc:
            raise SampleError("video frame missing", where, f"{self.camera}: {path}: {exc}") from None
        except Exception as exc:
            raise SampleError("undecodable video", where, f"{self.camera}: {path}: {exc}") from None

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None


@contextlib.contextmanager
def _renamed_into_place(path: Path):
    """Write to a temporary name and rename: a frame file is whole or absent. No fsync per frame
    (``runs.atomic_path`` syncs, ~20 ms a file here); the JSON that references the frames is synced."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
