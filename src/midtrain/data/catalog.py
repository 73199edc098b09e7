"""The sample catalog: one Parquet row per sample, VLM conversations and VLA frames alike.

Columns (``CATALOG_SCHEMA``):

- ``id`` (string, unique in a run): ``<source>/<local id>``
- ``source`` (string): dataset name from the config; ``kind``: ``"vlm"`` or ``"vla"``
- ``image_refs`` (list of struct ``{path, bytes}``): Hugging Face ``Image`` encoding;
  exactly one of ``path`` (absolute file path) or ``bytes`` (encoded PNG/JPEG) is set
- ``messages`` (list of struct ``{role, content}``): roles ``system|user|assistant``;
  ``content`` keeps ``<image>`` placeholders where the images go (VLM samples)
- ``instruction`` (string): the episode's task (VLA frames)
- ``episode``, ``frame`` (int64), ``state`` (list<float32>), ``action`` (list<list<float32>>,
  an H x A chunk starting at this frame), ``action_mask`` (list<bool>, False where the
  chunk ran past the episode end and was padded): VLA frames only
- ``origin`` (string): where the sample came from (``file:line``, ``file:row``,
  ``episode e frame f``), so errors downstream can name it
- ``content_hash`` (string): fingerprint of everything the row's features depend on - its
  text, numbers and its images' content (see ``midtrain.data.content``), so a stage can
  tell which rows changed when a referenced file did

Catalog directories hold ``<source>/part-NNNNN.parquet`` files (see ``catalog_files``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..runs import listed_files

IMAGE_STRUCT = pa.struct([("path", pa.string()), ("bytes", pa.binary())])
MESSAGE_STRUCT = pa.struct([("role", pa.string()), ("content", pa.string())])

CATALOG_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("image_refs", pa.list_(IMAGE_STRUCT)),
        ("messages", pa.list_(MESSAGE_STRUCT)),
        ("instruction", pa.string()),
        ("episode", pa.int64()),
        ("frame", pa.int64()),
        ("state", pa.list_(pa.float32())),
        ("action", pa.list_(pa.list_(pa.float32()))),
        ("action_mask", pa.list_(pa.bool_())),
        ("origin", pa.string()),
        ("content_hash", pa.string()),
    ]
)

def rows_to_table(rows: list[dict]) -> pa.Table:
    """Catalog rows (dicts with any subset of the columns) to a table with the full schema."""
    cols = {name: [r.get(name) for r in rows] for name in CATALOG_SCHEMA.names}
    return pa.table(cols, schema=CATALOG_SCHEMA)


def empty_answer(messages: list[dict] | None) -> bool:
    """A conversation whose assistant turns are all empty (or whitespace): nothing to learn from,
    though each turn would still carry its end-of-turn token. A per-sample error where rows enter
    the catalog and sft."""
    answers = [m.get("content") or "" for m in messages or () if m.get("role") == "assistant"]
    return bool(answers) and not any(a.strip() for a in answers)


def catalog_files(catalog_dir: Path | str) -> list[Path]:
    """The catalog part files its manifest lists, in a stable order (source, then part number)."""
    catalog_dir = Path(catalog_dir)
    files = listed_files(catalog_dir, "*/part-*.parquet")
    if not files:
        raise FileNotFoundError(f"{catalog_dir}: no catalog parts (expected <source>/part-NNNNN.parquet)")
    return files


def iter_catalog(
    catalog_dir: Path | str, columns: list[str] | None = None, batch_size: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream the catalog in record batches; memory is bounded by ``batch_size`` rows."""
    for path in catalog_files(catalog_dir):
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def catalog_num_rows(catalog_dir: Path | str) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in catalog_files(catalog_dir))


def iter_catalog_with_ids(
    catalog_dir: Path | str, ids: pa.Array | list[str], columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the catalog rows whose ``id`` is in ``ids`` (non-empty filtered batches, catalog order).

    ``columns`` must include ``id`` when given. Memory is bounded by a batch plus ``ids``.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    wanted = ids if isinstance(ids, pa.Array) else pa.array(ids, type=pa.string())
    for batch in iter_catalog(catalog_dir, columns=columns):
        mask = pc.is_in(batch.column("id"), value_set=wanted)
        if pc.any(mask).as_py():
            yield batch.filter(mask)


def catalog_rows_by_id(catalog_dir: Path | str, ids: list[str], columns: list[str] | None = None) -> dict[str, dict]:
    """``{id: row}`` of the catalog rows with these ids (a few: galleries, spot checks); ids not in
    the catalog are absent. Reading stops once every id is found."""
    found: dict[str, dict] = {}
    wanted = set(ids)
    for batch in iter_catalog_with_ids(catalog_dir, list(wanted), columns):
        for row in batch.to_pylist():
            found[row["id"]] = row
        if len(found) == len(wanted):
            break
    return found
