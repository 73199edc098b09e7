"""Feature shards: the artefact every analysis stage reads.

A features directory holds, per shard ``shard-NNNNN``:

- ``shard-NNNNN.npy``: ``float16`` array of shape ``[n, d]`` (memory-mappable with
  ``numpy.load(..., mmap_mode="r")``)
- ``shard-NNNNN.ids.parquet``: ``n`` rows of ``id``, ``source``, ``kind``, in the same order
- ``shard-NNNNN.done``: written last; a shard without it is incomplete and ignored

``manifest.json`` of the producing stage records ``dim``, ``model``, ``pooling``, ``dtype``.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runs import StageError, save_npy_atomic, write_json_atomic, write_parquet_atomic

IDS_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string())])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_feature_shard(shards_dir: Path, name: str, features: np.ndarray, ids: pa.Table, info: dict | None = None) -> None:
    """Write one shard atomically: array, ids, then the ``.done`` marker."""
    if features.ndim != 2 or features.shape[0] != ids.num_rows:
        raise ValueError(f"shard {name}: features {features.shape} do not match {ids.num_rows} ids")
    save_npy_atomic(shards_dir / f"{name}.npy", np.ascontiguousarray(features, dtype=np.float16))
    write_parquet_atomic(shards_dir / f"{name}.ids.parquet", ids.select(IDS_SCHEMA.names).cast(IDS_SCHEMA))
    write_json_atomic(shards_dir / f"{name}.done", {"rows": int(ids.num_rows), **(info or {})})


@dataclass
class FeatureSet:
    """All complete shards of a features directory, opened lazily (memory-mapped)."""

    root: Path
    names: list[str]
    manifest: dict

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def dim(self) -> int:
        return int(self.manifest.get("dim") or self.array(self.names[0]).shape[1])

    def array(self, name: str) -> np.ndarray:
        return np.load(self.shards_dir / f"{name}.npy", mmap_mode="r")

    def ids(self, name: str | None = None) -> pa.Table:
        if name is not None:
            return pq.read_table(self.shards_dir / f"{name}.ids.parquet")
        return pa.concat_tables([self.ids(n) for n in self.names]) if self.names else IDS_SCHEMA.empty_table()

    def __len__(self) -> int:
        return sum(self.array(n).shape[0] for n in self.names)

    def iter_shards(self) -> Iterator[tuple[str, np.ndarray, pa.Table]]:
        for name in self.names:
            yield name, self.array(name), self.ids(name)

    def sources(self) -> dict[str, str]:
        """source name -> kind."""
        out: dict[str, str] = {}
        for name in self.names:
            t = pq.read_table(self.shards_dir / f"{name}.ids.parquet", columns=["source", "kind"])
            for row in t.group_by(["source", "kind"]).aggregate([]).to_pylist():  # distinct pairs, not rows
                out.setdefault(row["source"], row["kind"])
        return out

    def rows_of(self, source: str | None = None, kind: str | None = None) -> np.ndarray:
        """Global row indices (into the concatenation of shards) matching source/kind."""
        import pyarrow.compute as pc

        t = self.ids()
        mask = pa.array(np.ones(t.num_rows, dtype=bool))
        if source is not None:
            mask = pc.and_(mask, pc.equal(t.column("source"), source))
        if kind is not None:
            mask = pc.and_(mask, pc.equal(t.column("kind"), kind))
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False))

    def take(self, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """Gather global rows into one in-memory array (for subsamples, not the whole pool)."""
        rows = np.asarray(rows, dtype=np.int64)
        sizes = [self.array(n).shape[0] for n in self.names]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        out = np.empty((len(rows), self.dim), dtype=dtype)
        shard_of = np.searchsorted(offsets, rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            out[sel] = self.array(self.names[s])[rows[sel] - offsets[s]]
        return out


def open_features(root: Path | str) -> FeatureSet:
    """Open a features directory (the output of ``midtrain featurize``)."""
    root = Path(root)
    shards = root / "shards"
    if not shards.exists():
        raise FileNotFoundError(f"{root}: not a features directory (no shards/ folder)")
    names = sorted(p.name[: -len(".done")] for p in shards.glob("shard-*.done"))
    if not names:
        raise FileNotFoundError(f"{root}: no complete feature shards")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return FeatureSet(root, names, manifest)


# --------------------------------------------------------------------------- streaming reads


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and byte offset of the data in a ``.npy`` file (C order required)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fh)
        offset = fh.tell()
    if fortran:
        raise StageError(f"{path}: Fortran-ordered array; feature shards must be C-ordered")
    return shape, dtype, offset


def stream_feature_chunks(path: Path, chunk_rows: int = 1024, release_every: int = 32 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, chunk)`` views ``[<=chunk_rows, d]`` of a ``.npy`` feature shard.

    The file is memory-mapped copy-on-write (never written back: the views are writable
    only so torch can wrap them without a copy); every ``release_every`` bytes the pages
    already consumed are dropped from this process (``MADV_DONTNEED``; the OS page cache
    keeps them), so resident memory stays bounded by the window, not the shard or pool
    size. A yielded view is only valid until the next iteration.
    """
    shape, dtype, offset = npy_layout(path)
    if len(shape) != 2:
        raise StageError(f"{path}: expected a 2-D feature array, got shape {shape}")
    n, d = shape
    if n == 0:
        return
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    arr = np.frombuffer(mm, dtype=dtype, count=n * d, offset=offset).reshape(n, d)
    row_bytes = d * dtype.itemsize
    released = 0
    can_release = hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED")
    try:
        for start in range(0, n, chunk_rows):
            yield start, arr[start : start + chunk_rows]
            end = offset + min(start + chunk_rows, n) * row_bytes
            if can_release and end - released >= release_every:
                upto = end // mmap.PAGESIZE * mmap.PAGESIZE
                mm.madvise(mmap.MADV_DONTNEED, released, upto - released)
                released = upto
    finally:
        del arr  # the mapping is closed when the last view is gone
