"""Which feature rows are the VLM pool and which the VLA target set.

Shared by fit, score and select (all in this package). Rows are *global* indices into
the concatenation of a feature run's shards, in shard order. ``RowLocator`` turns a
global row back into ``shard file + row`` for error messages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.features import FeatureSet, open_features
from ..runs import RunDir, StageError

POOL_KIND, VLA_KIND = "vlm", "vla"


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


def resolve_features(features: Path | None, run_dir: RunDir) -> FeatureRun:
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
            h.update((fs.shards_dir / f"{name}.ids.parquet").read_bytes())
        fingerprint = "shards:" + h.hexdigest()
    return FeatureRun(fs, fingerprint, manifest_path if manifest_path.exists() else fs.shards_dir)


def shard_offsets(fs: FeatureSet) -> np.ndarray:
    """``offsets[i]`` = global row of shard i's first row; ``offsets[-1]`` = total rows."""
    sizes = [int(pq.ParquetFile(fs.shards_dir / f"{n}.ids.parquet").metadata.num_rows) for n in fs.names]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


class RowLocator:
    """Global feature row -> ``(shard name, local row)`` and a human-readable location."""

    def __init__(self, fs: FeatureSet):
        self.fs = fs
        self.offsets = shard_offsets(fs)

    def locate(self, row: int) -> tuple[str, int]:
        s = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return self.fs.names[s], int(row - self.offsets[s])

    def where(self, row: int) -> str:
        name, local = self.locate(row)
        return f"{self.fs.shards_dir / (name + '.npy')} row {local}"

    def id_of(self, row: int) -> str:
        name, local = self.locate(row)
        return str(self.fs.ids(name).column("id")[local])


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
    offsets = shard_offsets(fs)
    out = []
    for i, name in enumerate(fs.names):
        t = pq.read_table(fs.shards_dir / f"{name}.ids.parquet", columns=["source", "kind"])
        out.append(np.flatnonzero(rows_mask(t, kind, sources)) + offsets[i])
    rows = np.concatenate(out) if out else np.empty(0, np.int64)
    if len(rows) == 0:
        raise empty_set_error(fs, kind, sources)
    return rows.astype(np.int64)
