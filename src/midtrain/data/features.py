"""Feature shards: the artefact every analysis stage reads.

A features directory holds, per shard ``shard-NNNNN``:

- ``shard-NNNNN.npy``: ``float16`` array of shape ``[n, d]`` (memory-mappable with
  ``numpy.load(..., mmap_mode="r")``)
- ``shard-NNNNN.ids.parquet``: ``n`` rows of ``id``, ``source``, ``kind``, in the same order
- ``shard-NNNNN.done``: written last; a shard without it is incomplete and ignored

``manifest.json`` of the producing stage records ``dim``, ``model``, ``pooling``, ``dtype``.

Rows are addressed two ways: *global* rows index the concatenation of a feature run's shards in
shard order (what fit, score, select and gap sample and gather), and ``(shard, local row)`` names
the file a user can open (what error messages say). :class:`FeatureSet` converts between them, and
between rows and sample ids; :func:`select_rows` picks the VLM pool (``kind: vlm``) or the VLA
target set (``kind: vla``); :func:`load_finite_rows` gathers rows and hands the ones holding
NaN/inf to the caller's policy (record, raise or drop).
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..runs import StageError, listed_files, save_npy_atomic, write_json_atomic, write_parquet_atomic

if TYPE_CHECKING:
    from ..runs import RunDir

POOL_KIND, VLA_KIND = "vlm", "vla"

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
            return pq.read_table(self.ids_file(name))
        return pa.concat_tables([self.ids(n) for n in self.names]) if self.names else IDS_SCHEMA.empty_table()

    def ids_file(self, name: str) -> Path:
        return self.shards_dir / f"{name}.ids.parquet"

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """``offsets[i]`` = global row of shard i's first row; ``offsets[-1]`` = total rows (from
        the ids files' Parquet metadata: no array or column is read)."""
        sizes = [int(pq.ParquetFile(self.ids_file(n)).metadata.num_rows) for n in self.names]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def sources(self) -> dict[str, str]:
        """source name -> kind."""
        out: dict[str, str] = {}
        for name in self.names:
            t = pq.read_table(self.ids_file(name), columns=["source", "kind"])
            for row in t.group_by(["source", "kind"]).aggregate([]).to_pylist():  # distinct pairs, not rows
                out.setdefault(row["source"], row["kind"])
        return out

    def rows_of(self, source: str | None = None, kind: str | None = None) -> np.ndarray:
        """Global row indices (into the concatenation of shards) matching source/kind."""
        t = self.ids()
        mask = pa.array(np.ones(t.num_rows, dtype=bool))
        if source is not None:
            mask = pc.and_(mask, pc.equal(t.column("source"), source))
        if kind is not None:
            mask = pc.and_(mask, pc.equal(t.column("kind"), kind))
        return np.flatnonzero(mask.to_numpy(zero_copy_only=False))

    # ------------------------------------------------------------------ global row <-> shard, id

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """Shard index of each global row."""
        return np.searchsorted(self.offsets, np.asarray(rows, dtype=np.int64), side="right") - 1

    def locate(self, row: int) -> tuple[str, int]:
        """Global row -> ``(shard name, local row)``."""
        s = int(self.shard_of(np.array([row]))[0])
        return self.names[s], int(row - self.offsets[s])

    def where(self, row: int) -> str:
        """A global row as a location a user can open: ``<shards>/shard-NNNNN.npy row R``."""
        name, local = self.locate(row)
        return f"{self.shards_dir / (name + '.npy')} row {local}"

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """Sample ids of global ``rows`` (any order), reading only the ``id`` column of the shards involved."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=object)
        shard_of = self.shard_of(rows)
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            ids = pq.read_table(self.ids_file(self.names[s]), columns=["id"]).column("id")
            out[sel] = ids.take(pa.array(rows[sel] - self.offsets[s])).to_pylist()
        return out.tolist()

    def id_of(self, row: int) -> str:
        return self.ids_of(np.array([row]))[0]

    def rows_of_ids(self, ids: pa.Array) -> np.ndarray:
        """Global rows of ``ids`` (aligned with ``ids``; -1 where absent), streaming the shards' id files."""
        out = np.full(len(ids), -1, dtype=np.int64)
        for s, name in enumerate(self.names):
            shard_ids = pq.read_table(self.ids_file(name), columns=["id"]).column("id")
            pos = pc.index_in(shard_ids, value_set=ids)
            hit = np.flatnonzero(pc.is_valid(pos).to_numpy(zero_copy_only=False))
            if len(hit):
                out[pos.to_numpy(zero_copy_only=False)[hit].astype(np.int64)] = hit + self.offsets[s]
        return out

    def take(self, rows: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """Gather global rows into one in-memory array (for subsamples, not the whole pool)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=dtype)
        shard_of = self.shard_of(rows)
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            out[sel] = self.array(self.names[s])[rows[sel] - self.offsets[s]]
        return out


def open_features(root: Path | str) -> FeatureSet:
    """Open a features directory (the output of ``midtrain featurize``)."""
    root = Path(root)
    shards = root / "shards"
    if not shards.exists():
        raise FileNotFoundError(f"{root}: not a features directory (no shards/ folder)")
    names = [p.name[: -len(".done")] for p in listed_files(root, "shards/shard-*.done")]
    if not names:
        raise FileNotFoundError(f"{root}: no complete feature shards")
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return FeatureSet(root, names, manifest)


def load_finite_rows(
    fs: FeatureSet, rows: np.ndarray, on_non_finite: Callable[[np.ndarray], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features of global ``rows`` as float32 ``[n, dim]``, without the rows holding NaN/inf.

    ``on_non_finite(bad_rows)`` is called first with the global rows left out, so the caller
    applies its policy (record a :class:`~midtrain.runs.SampleError` per row, raise, warn).
    Returns ``(features, kept rows)``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    x = fs.take(rows)
    finite = np.isfinite(x).all(axis=1)
    if finite.all():
        return x, rows
    if on_non_finite is not None:
        on_non_finite(rows[~finite])
    return x[finite], rows[finite]


# --------------------------------------------------------------------------- the pool and the VLA set


@dataclass
class FeatureRun:
    """An opened feature run plus what identifies it (``fingerprint``) and what to hash as
    a stage input (``input_path``: its manifest when there is one, else its shards)."""

    features: FeatureSet
    fingerprint: str
    input_path: Path

    @property
    def root(self) -> Path:
        return self.features.root


def resolve_features(features: Path | None, run_dir: "RunDir") -> FeatureRun:
    """Open ``features`` or, by default, the run's completed ``featurize`` stage."""
    root = Path(features) if features is not None else run_dir.require("featurize")
    try:
        fs = open_features(root)
    except FileNotFoundError as exc:
        raise StageError(f"{exc}; point `features:` at the output of `midtrain featurize`") from None
    manifest_path = root / "manifest.json"
    fingerprint = fs.manifest.get("fingerprint")
    if not fingerprint:  # a features directory written outside a midtrain run: hash what identifies it
        h = hashlib.blake2b(digest_size=16)
        for name in fs.names:
            h.update(name.encode())
            h.update((fs.shards_dir / f"{name}.done").read_bytes())
            h.update(fs.ids_file(name).read_bytes())
        fingerprint = "shards:" + h.hexdigest()
    return FeatureRun(fs, fingerprint, manifest_path if manifest_path.exists() else fs.shards_dir)


def check_sources(fs: FeatureSet, kind: str, sources: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``{source: kind}`` of the feature run; StageError naming the known sources when a
    requested source is absent or of the other kind."""
    known = fs.sources()
    for src in sources:
        if src not in known:
            raise StageError(
                f"{fs.root}: source {src!r} is not in the feature run; known {kind} sources: "
                f"{', '.join(sorted(s for s, k in known.items() if k == kind)) or '(none)'}"
            )
        if known[src] != kind:
            raise StageError(f"{fs.root}: source {src!r} has kind {known[src]!r}, not {kind!r}")
    return known


def rows_mask(ids: pa.Table, kind: str, sources: list[str] | tuple[str, ...] = ()) -> np.ndarray:
    """Boolean mask of the rows of one shard's ids table that have ``kind`` (and one of ``sources``)."""
    mask = np.asarray(ids.column("kind").to_numpy(zero_copy_only=False) == kind)
    if sources:
        mask &= np.isin(ids.column("source").to_numpy(zero_copy_only=False), list(sources))
    return mask


def empty_set_error(fs: FeatureSet, kind: str, sources: list[str] | tuple[str, ...] = ()) -> StageError:
    what = "VLA (kind 'vla')" if kind == VLA_KIND else "VLM pool (kind 'vlm')"
    restrict = f" among sources {sorted(sources)}" if sources else ""
    return StageError(
        f"{fs.root}: the {what} set is empty{restrict}; sources in this feature run: "
        f"{', '.join(f'{s} ({k})' for s, k in sorted(fs.sources().items())) or '(none)'}"
    )


def select_rows(fs: FeatureSet, kind: str, sources: list[str] | tuple[str, ...] = ()) -> np.ndarray:
    """Global rows of ``kind`` (``vlm`` pool or ``vla`` target), restricted to ``sources`` if given.

    Raises StageError naming the known sources when a requested source is absent or of
    the other kind, and when no row matches.
    """
    check_sources(fs, kind, sources)
    out = []
    for i, name in enumerate(fs.names):
        t = pq.read_table(fs.ids_file(name), columns=["source", "kind"])
        out.append(np.flatnonzero(rows_mask(t, kind, sources)) + fs.offsets[i])
    rows = np.concatenate(out) if out else np.empty(0, np.int64)
    if len(rows) == 0:
        raise empty_set_error(fs, kind, sources)
    return rows.astype(np.int64)


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
