"""Robot data for policy training: rows from the catalog or a LeRobot dataset, checked, split by episode.

Rows are VLA catalog rows (:mod:`midtrain.data.catalog`): camera images, instruction, state,
an action chunk and its mask. A LeRobot dataset is read with the catalog's own reader
(:class:`midtrain.data.lerobot.LeRobotReader`), frames kept as PNG (lossless: the policy trains on
the decoded video frames themselves).

Bad input is found before the first training step, each as one line naming the dataset, the
episode and the frame: a chunk of another action dimension than the rest (or than the policy
being continued), a NaN in an action or a state, an episode shorter than ``min_episode_length``
(default: the chunk size), a camera the data lacks. Per-frame and per-episode problems follow
``on_error`` (``skip`` records them and leaves the frame or episode out); problems of a whole
dataset (a missing camera, chunks shorter than the policy's) always stop the stage.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..runs import SampleError, StageError

COLUMNS = ["id", "source", "kind", "image_refs", "instruction", "episode", "frame", "state", "action", "action_mask", "origin"]


@dataclass
class RobotData:
    """Checked rows of one or more robot datasets and what a policy must know about them."""

    name: str
    rows: list[dict]
    action_dim: int
    state_dim: int
    camera_keys: list[str]
    image_size: list[int]
    action_names: list[str] = field(default_factory=list)
    state_names: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Meta:
    """What a dataset's own metadata says: camera keys (in row order) and dimension names."""

    cameras: list[str]
    action_names: list[str]
    state_names: list[str]
    action_dim: Optional[int] = None
    state_dim: Optional[int] = None


def _names(feature: dict | None) -> list[str]:
    names = (feature or {}).get("names")
    if isinstance(names, dict):  # LeRobot sometimes nests {"motors": [...]}
        names = next(iter(names.values()), None)
    return [str(n) for n in names] if isinstance(names, list) else []


def lerobot_meta(root: Path, cameras: Optional[list[str]], state_key: str = "observation.state", action_key: str = "action") -> _Meta:
    from ..data.lerobot import load_lerobot_info

    feats = load_lerobot_info(root)["features"]
    all_cams = [k for k, f in feats.items() if f.get("dtype") in ("video", "image")]
    cams = list(cameras) if cameras is not None else all_cams
    missing = [c for c in cams if c not in all_cams]
    if missing:
        raise StageError(f"{root}: camera {missing[0]!r} is not in the dataset; its cameras are {all_cams} (set data.cameras)")
    shape = lambda k: int((feats.get(k) or {}).get("shape", [0])[0]) if k in feats else None  # noqa: E731
    return _Meta(cams, _names(feats.get(action_key)), _names(feats.get(state_key)), shape(action_key), shape(state_key))


def training_frames_record(kind: str, path: Path, camera_keys: list[str], image_size: list[int],
                           sources: Optional[set] = None) -> dict:  # fmt: skip
    """How the training frames were made, for the policy directory (``training_frames.json``, read
    by ``midtrain eval``): the cameras, the frame size and, per data source, its format and - for a
    LeRobot dataset - each camera's video info as ``meta/info.json`` records it (codec, pixel
    format), so an evaluation can pass its frames through the same codec. ``sources``: the names
    of the catalog sources the rows came from (None: all)."""
    if kind == "lerobot":
        listed = [{"name": path.name or "lerobot", "format": "lerobot", "path": str(path)}]
    else:
        manifest = path / "manifest.json"
        datasets = json.loads(manifest.read_text()).get("config", {}).get("datasets", []) if manifest.is_file() else []
        listed = [{"name": d.get("name"), "format": d.get("format"), "path": str(d.get("path", ""))}
                  for d in datasets if d.get("kind") == "vla" and (sources is None or d.get("name") in sources)]  # fmt: skip
    out = []
    for src in listed:
        root = Path(src["path"])
        entry = {**src, "fps": None, "video": {}}
        if src["format"] == "lerobot" and (root / "meta" / "info.json").is_file():
            from ..data.lerobot import load_lerobot_info

            info = load_lerobot_info(root)
            feats = info.get("features", {})
            entry["fps"] = info.get("fps")
            entry["video"] = {k: feats[k].get("info", {}) for k in camera_keys if (feats.get(k) or {}).get("dtype") == "video"}
        out.append(entry)
    return {"camera_keys": list(camera_keys), "image_size": list(image_size), "sources": out}


# --------------------------------------------------------------------------- reading


def read_lerobot(root: Path, chunk_size: int, cameras: Optional[list[str]], episodes: Optional[list[int]], stride: int,
                 seed: int, handle: Callable[[SampleError], None]) -> tuple[list[dict], _Meta]:  # fmt: skip
    """Every kept frame of a LeRobot dataset as a row (images PNG-encoded, chunk of ``chunk_size``)."""
    from ..data.lerobot import LeRobotReader
    from ..data.sources import DatasetSource

    meta = lerobot_meta(root, cameras)
    name = root.name or "lerobot"
    source = DatasetSource(name=name, kind="vla", format="lerobot", path=root, chunk_size=chunk_size,
                           cameras=meta.cameras, frame_stride=stride, image_format="png", episodes=episodes)  # fmt: skip
    rows = []
    for _, item in LeRobotReader(source, seed).iter_samples():
        if isinstance(item, SampleError):
            handle(item)
            continue
        item.update(id=f"{name}/{item['id']}", source=name, kind="vla")
        rows.append(item)
    return rows, meta


def _catalog_meta(catalog: Path, cameras: Optional[list[str]]) -> dict[str, _Meta]:
    """Per catalog source: camera keys and names, from the catalog manifest's source config and,
    for LeRobot sources, the dataset's ``meta/info.json``."""
    manifest = catalog / "manifest.json"
    out: dict[str, _Meta] = {}
    if not manifest.is_file():
        return out
    for src in json.loads(manifest.read_text()).get("config", {}).get("datasets", []):
        if src.get("kind") != "vla":
            continue
        root = Path(src.get("path", ""))
        if src.get("format") == "lerobot" and (root / "meta" / "info.json").is_file():
            meta = lerobot_meta(root, src.get("cameras"), src.get("state_key", "observation.state"), src.get("action_key", "action"))
        else:
            meta = _Meta(list(src.get("cameras") or []), [], [])
        out[src["name"]] = meta
    return out


def read_catalog(catalog: Path, sources: list[str], cameras: Optional[list[str]]) -> tuple[list[dict], dict[str, _Meta]]:
    """VLA rows of ``sources`` (all VLA sources when empty) of a catalog directory; with ``cameras``,
    only those images, in that order."""
    import pyarrow.parquet as pq

    from ..data.catalog import catalog_files

    files = catalog_files(catalog)
    metas = _catalog_meta(catalog, None)
    rows: list[dict] = []
    found = set()
    for path in files:
        source = path.parent.name
        if sources and source not in sources:
            continue
        table = pq.read_table(path, columns=COLUMNS)
        table = table.filter(table.column("kind").to_numpy(zero_copy_only=False) == "vla")
        if not table.num_rows:
            continue
        found.add(source)
        keep = None
        if cameras is not None:
            known = metas.get(source, _Meta([], [], [])).cameras
            missing = [c for c in cameras if c not in known]
            if missing:
                raise StageError(f"{catalog}/{source}: camera {missing[0]!r} is not in this source; its cameras are "
                                 f"{known or 'not recorded in the catalog manifest'} (set data.cameras)")  # fmt: skip
            keep = [known.index(c) for c in cameras]
        for row in table.to_pylist():
            if keep is not None:
                row["image_refs"] = [row["image_refs"][i] for i in keep]
            rows.append(row)
    unknown = sorted(set(sources) - found)
    if unknown:
        raise StageError(f"{catalog}: data.sources: {unknown} have no VLA rows in this catalog")
    if not rows:
        raise StageError(f"{catalog}: no VLA rows (catalog a robot dataset with kind: vla first)")
    return rows, metas


# --------------------------------------------------------------------------- checks


def _where(row: dict) -> str:
    return row.get("origin") or f"{row.get('source')} episode {row.get('episode')} frame {row.get('frame')}"


def check_rows(rows: list[dict], dataset: str, chunk_size: int, min_episode_length: int, action_dim: Optional[int],
               state_dim: Optional[int], handle: Callable[[SampleError], None],
               expected_from: str = "") -> tuple[list[dict], dict[str, int]]:  # fmt: skip
    """The rows that pass the per-frame and per-episode checks (see the module docstring).

    ``action_dim`` / ``state_dim``: what the rows must have (a continued policy's, or the
    metadata's; None: the first row's). ``handle`` applies ``on_error`` to each bad frame/episode.
    """
    if not rows:
        raise StageError(f"{dataset}: no frames to train on")
    first = rows[0]
    a_dim = action_dim if action_dim is not None else np.asarray(first["action"]).shape[-1]
    s_dim = state_dim if state_dim is not None else (len(first["state"]) if first.get("state") is not None else 0)
    since = f" ({expected_from})" if expected_from else ""
    kept, bad_frames = [], 0
    lengths: dict[tuple, int] = {}
    for row in rows:
        action = np.asarray(row["action"], dtype=np.float32)
        where = _where(row)
        if action.ndim != 2 or action.shape[0] < chunk_size:
            raise StageError(f"{where}: action chunks of {action.shape[0] if action.ndim == 2 else 0} steps, but "
                             f"policy.chunk_size is {chunk_size}; catalog the dataset with chunk_size >= {chunk_size}")  # fmt: skip
        error = None
        state = row.get("state")
        if action.shape[1] != a_dim:
            error = SampleError("action dimension differs", where, f"{action.shape[1]}-D action, expected {a_dim}-D{since}", row["id"])
        elif s_dim and (state is None or len(state) != s_dim):
            got = "no state" if state is None else f"{len(state)}-D state"
            error = SampleError("state dimension differs", where, f"{got}, expected {s_dim}-D{since}", row["id"])
        elif not np.isfinite(action[:chunk_size]).all():
            step, dim = (int(v[0]) for v in np.nonzero(~np.isfinite(action[:chunk_size])))
            error = SampleError("NaN or inf in action", where, f"chunk step {step} (frame {row.get('frame', 0) + step}), dimension {dim}", row["id"])
        elif s_dim and not np.isfinite(np.asarray(state, dtype=np.float32)).all():
            error = SampleError("NaN or inf in state", where, f"dimension {int(np.flatnonzero(~np.isfinite(np.asarray(state, dtype=np.float32)))[0])}", row["id"])
        if error is not None:
            handle(error)
            bad_frames += 1
            continue
        key = (row.get("source"), row.get("episode"))
        end = int(row.get("frame") or 0) + int(np.sum(row["action_mask"]))
        lengths[key] = max(lengths.get(key, 0), end)
        kept.append(row)
    short = {k for k, n in lengths.items() if n < min_episode_length}
    for key in sorted(short, key=str):
        where = f"{dataset} source {key[0]} episode {key[1]}"
        handle(SampleError("episode shorter than needed", where,
                           f"{lengths[key]} frames < {min_episode_length} (data.min_episode_length, default the chunk size)"))  # fmt: skip
    if short:
        kept = [r for r in kept if (r.get("source"), r.get("episode")) not in short]
    if not kept:
        raise StageError(f"{dataset}: every frame was left out by the checks (see errors.jsonl)")
    counts = {"frames": len(kept), "frames_skipped": bad_frames + (len(rows) - bad_frames - len(kept)),
              "episodes": len(lengths) - len(short), "episodes_skipped": len(short), "action_dim": int(a_dim),
              "state_dim": int(s_dim)}  # fmt: skip
    return kept, counts


def image_size_of(row: dict) -> list[int]:
    """``[height, width]`` of a row's first image."""
    from PIL import Image

    ref = row["image_refs"][0]
    if ref.get("bytes") is not None:
        with Image.open(io.BytesIO(ref["bytes"])) as img:
            w, h = img.size
    else:
        with Image.open(ref["path"]) as img:
            w, h = img.size
    return [int(h), int(w)]


# --------------------------------------------------------------------------- split


def split_by_episode(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict], list[list]]:
    """``(train rows, validation rows, held-out [source, episode] pairs)``: whole episodes are held
    out, ``round(val_fraction * episodes)`` of them (at least one when ``val_fraction > 0`` and
    there are two or more), chosen by a seeded permutation."""
    episodes = sorted({(str(r.get("source")), int(r.get("episode") or 0)) for r in rows})
    n_val = 0
    if val_fraction > 0 and len(episodes) > 1:
        n_val = min(len(episodes) - 1, max(1, int(round(val_fraction * len(episodes)))))
    order = np.random.default_rng(seed).permutation(len(episodes))
    held = {episodes[i] for i in order[:n_val]}
    train = [r for r in rows if (str(r.get("source")), int(r.get("episode") or 0)) not in held]
    val = [r for r in rows if (str(r.get("source")), int(r.get("episode") or 0)) in held]
    return train, val, [list(e) for e in sorted(held)]
