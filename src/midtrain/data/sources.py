"""Dataset sources: how a config names a dataset, and the reader contract every format follows.

A source is one dataset declared in the ``catalog`` stage config::

    datasets:
      - {name: llava_mix, kind: vlm, format: llava_json, path: data/llava_v1_5_mix665k.json,
         image_root: data/images, max_samples: 100000}
      - {name: robot, kind: vla, format: lerobot, path: data/my_lerobot_dataset, chunk_size: 16}

Readers turn a source into catalog rows, streamed. They all follow ``SampleReader``:
records are numbered ``0..N-1`` in file order; a ``Selection`` (the seeded sample cap)
says which records are wanted; ``iter_samples(start)`` yields ``(position, row)`` or
``(position, SampleError)`` where ``position`` is the rank among wanted records. A
stage that stopped after position ``p`` resumes with ``iter_samples(p + 1)``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import numpy as np

from ..runs import SampleError
from .images import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class DatasetSource:
    """One dataset to read into the catalog.

    Common keys:
      ``name`` (unique in the run; the catalog folder and id prefix), ``kind`` (``vlm`` for
      vision-language data, ``vla`` for robot frames), ``format``, ``path`` (file or
      directory), ``image_root`` (base for relative image paths; default: the directory of
      the data file), ``max_samples`` (seeded random subset of this size, chosen without
      reading the data twice where the count is cheap), ``seed`` (default: the stage seed),
      ``id_field`` (record field / column giving the sample's own id; ``null`` uses the
      record index), ``verify_images`` (open every referenced image file once; catches
      corrupt files at catalog time instead of mid-featurization).

    Safety keys (each failure is a bad sample naming the file and record, skipped under
    ``on_error: skip``):
      ``allow_outside_root`` (default false: an image path must stay inside ``image_root``;
      ``..`` that climbs out, ``~`` and absolute paths elsewhere are refused, so a hostile
      dataset cannot pull local files into a mixture. Symlinks inside the root are
      followed: datasets such as the Hugging Face cache link to blobs elsewhere);
      ``max_text_chars`` (default 1,000,000: a conversation longer than this, summed over
      its turns, is refused at read time, before anything tokenises it; a JSON Lines line
      or JSON array element over ``8 * max_text_chars`` bytes is refused unparsed);
      ``max_image_pixels`` (default 89,478,485, PIL's warning threshold: images whose
      header declares more pixels are refused before decoding; checked when
      ``verify_images`` opens them, and again wherever images are decoded).

    Parquet / HF-on-disk keys (``None`` = auto-detect, see ``midtrain.data.tabular``):
      ``split``, ``image_column``, ``messages_column``, ``prompt_column``, ``response_column``.

    LeRobot keys:
      ``chunk_size`` H: action chunk length (default 16, within the 10-50 range of
      chunked-action VLAs such as ACT/pi0/SmolVLA, short enough to stay on-task);
      ``cameras`` (feature keys, default all video/image features in ``info.json`` order);
      ``frame_stride`` (keep every k-th frame of an episode); ``image_format`` of the
      decoded frames stored as bytes in the catalog (``jpeg`` quality 95 by default:
      ~5x smaller than PNG, visually lossless for featurization); ``state_key``,
      ``action_key``; ``episodes`` (only these episode indices).
    """

    name: str
    kind: Literal["vlm", "vla"]
    format: Literal["llava_json", "llava_jsonl", "parquet", "hf_disk", "lerobot"]
    path: Path
    image_root: Optional[Path] = None
    max_samples: Optional[int] = None
    seed: Optional[int] = None
    id_field: Optional[str] = "id"
    verify_images: bool = True
    allow_outside_root: bool = False
    max_text_chars: int = 1_000_000
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # parquet / hf_disk
    split: Optional[str] = None
    image_column: Optional[str] = None
    messages_column: Optional[str] = None
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    # lerobot
    chunk_size: int = 16
    cameras: Optional[list[str]] = None
    frame_stride: int = 1
    image_format: Literal["jpeg", "png"] = "jpeg"
    state_key: str = "observation.state"
    action_key: str = "action"
    episodes: Optional[list[int]] = None

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field problems as ``(key, message)`` pairs (the stage config prefixes the index)."""
        out = []
        if not self.name or "/" in self.name or self.name.startswith(".") or self.name != self.name.strip():
            out.append(("name", f"{self.name!r} must be a non-empty folder name without '/' or a leading '.'"))
        if self.max_samples is not None and self.max_samples < 1:
            out.append(("max_samples", f"must be >= 1 (or null for all samples), got {self.max_samples}"))
        if self.max_text_chars < 1:
            out.append(("max_text_chars", f"must be >= 1, got {self.max_text_chars}"))
        if self.max_image_pixels < 1:
            out.append(("max_image_pixels", f"must be >= 1, got {self.max_image_pixels}"))
        if self.chunk_size < 1:
            out.append(("chunk_size", f"must be >= 1, got {self.chunk_size}"))
        if self.frame_stride < 1:
            out.append(("frame_stride", f"must be >= 1, got {self.frame_stride}"))
        if self.format == "lerobot" and self.kind != "vla":
            out.append(("kind", "a lerobot source yields robot frames; use kind: vla"))
        if self.format != "lerobot":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in ("cameras", "episodes"):
                if getattr(self, key) != defaults[key]:
                    out.append((key, f"only applies to format: lerobot (this source is {self.format})"))
        return out


# --------------------------------------------------------------------------- sample selection


@dataclass
class Selection:
    """Which records of a source are read, and their positions in the output stream.

    ``chosen`` is ``None`` (every record, position = record index) or the sorted record
    indices of a seeded random subset (position = rank in ``chosen``). Memory is
    O(max_samples), never O(dataset).
    """

    chosen: Optional[np.ndarray]
    start: int = 0

    @classmethod
    def make(cls, total: Optional[int], max_samples: Optional[int], seed: int, start: int = 0) -> "Selection":
        if max_samples is None or total is None or max_samples >= total:
            return cls(None, start)
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=max_samples, replace=False)).astype(np.int64)
        return cls(chosen, start)

    def wants(self, record: int) -> bool:
        if self.chosen is None:
            return record >= self.start
        i = int(np.searchsorted(self.chosen, record))
        return i >= self.start and i < len(self.chosen) and int(self.chosen[i]) == record

    def mask(self, lo: int, hi: int) -> np.ndarray:
        """Boolean mask over records ``lo..hi-1`` (vectorised ``wants``)."""
        if self.chosen is None:
            return np.arange(lo, hi) >= self.start
        sel = self.chosen[self.start :]
        out = np.zeros(hi - lo, dtype=bool)
        inside = sel[(sel >= lo) & (sel < hi)]
        out[inside - lo] = True
        return out

    def position(self, record: int) -> int:
        if self.chosen is None:
            return record
        return int(np.searchsorted(self.chosen, record))

    def expected(self, total: Optional[int]) -> Optional[int]:
        """How many records will be yielded from ``start`` on (for progress bars)."""
        if self.chosen is not None:
            return max(0, len(self.chosen) - self.start)
        return None if total is None else max(0, total - self.start)


Item = Union[dict, SampleError]


class SampleReader:
    """Base class of the format readers: a count, and records streamed in order.

    Subclasses implement ``count_records()`` (``None`` when counting would need an extra
    pass and no cap asks for it) and ``records(selection)`` yielding
    ``(record_index, row | SampleError)`` for every wanted record. Rows are catalog row
    dicts whose ``id`` is the *local* id (the stage prefixes ``<source>/``).
    """

    def __init__(self, source: DatasetSource, seed: int):
        self.source = source
        self.seed = seed

    def count_records(self, need: bool) -> Optional[int]:
        raise NotImplementedError

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        raise NotImplementedError

    def selection(self, start: int = 0) -> tuple[Selection, Optional[int]]:
        total = self.count_records(need=self.source.max_samples is not None)
        return Selection.make(total, self.source.max_samples, self.seed, start), total

    def iter_samples(self, start: int = 0) -> Iterator[tuple[int, Item]]:
        """``(position, row | SampleError)`` from output position ``start`` on."""
        selection, _ = self.selection(start)
        for record, item in self.records(selection):
            yield selection.position(record), item


def max_record_bytes(source: DatasetSource) -> int:
    """Bytes beyond which one raw record (a JSON line or array element) is refused unparsed:
    room for ``max_text_chars`` characters written as 6-byte ``\\uXXXX`` escapes, plus keys."""
    return 8 * source.max_text_chars + 65_536


def resolve_image_path(value: str, image_root: Path, allow_outside_root: bool = True) -> Path:
    """The file an image path names: relative paths are relative to ``image_root``.

    Unless ``allow_outside_root``, the path must stay inside ``image_root`` once ``.`` and
    ``..`` are resolved (lexically: symlinks inside the root are followed as the dataset
    laid them out); ``~`` paths, and absolute paths outside the root, raise ``ValueError``.
    """
    if allow_outside_root:
        p = Path(value).expanduser()
        return p if p.is_absolute() else image_root / p
    if value.startswith("~"):
        raise ValueError("a '~' path points into a home directory, outside image_root")
    root = Path(os.path.normpath(Path(image_root).absolute()))
    target = Path(os.path.normpath(root / value))  # an absolute value replaces root here
    if target != root and root not in target.parents:
        kind = "an absolute path" if Path(value).is_absolute() else "it climbs out with '..'"
        raise ValueError(f"{kind} outside image_root {root}")
    return target


def checked_image_ref(
    value: object, image_root: Path, where: str, sample_id: str | None, source: DatasetSource, verify: bool | None = None
) -> dict:
    """One image given as a path string, raw bytes or an HF ``{path, bytes}`` dict -> an image ref.

    Raises ``SampleError`` ``missing image file`` / ``undecodable image`` / ``image too
    large`` / ``image path outside root`` / ``bad image reference`` naming ``where``.
    ``verify`` (default: the source's ``verify_images``) opens the image: the pixel limit
    (``max_image_pixels``) is checked from the header, then PIL checks the file (header
    and, for PNG, checksums; cheap compared to a full decode).
    """
    import io

    from .images import ImageTooLarge, open_image, ref_from_bytes, ref_from_path

    verify = source.verify_images if verify is None else verify

    def check(file, label: str) -> None:
        try:
            with open_image(file, source.max_image_pixels) as img:
                img.verify()
        except ImageTooLarge as exc:
            raise SampleError("image too large", where, f"{label}: {exc}", sample_id) from None
        except Exception as exc:  # whatever PIL raises on a broken or hostile file
            raise SampleError("undecodable image", where, f"{label}: {exc}", sample_id) from None

    data = None
    path = None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise SampleError("bad image reference", where, "an image entry has neither bytes nor path", sample_id)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, (str, Path)) and str(value):
        path = str(value)
    else:
        raise SampleError("bad image reference", where, f"expected a path string, got {value!r:.80}", sample_id)
    if data is not None:
        if verify:
            check(io.BytesIO(data), "embedded bytes")
        return ref_from_bytes(data)
    if "://" in str(path):
        raise SampleError("missing image file", where, f"{path}: remote URLs are not fetched; download first", sample_id)
    try:
        file = resolve_image_path(str(path), image_root, source.allow_outside_root)
    except ValueError as exc:
        raise SampleError(
            "image path outside root", where, f"{path}: {exc}; set allow_outside_root: true to allow it", sample_id
        ) from None
    if not file.is_file():
        raise SampleError("missing image file", where, str(file), sample_id)
    if verify:
        check(file, str(file))
    return ref_from_path(file)
