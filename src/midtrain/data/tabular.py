"""Tabular sources: Parquet files and Hugging Face ``datasets`` saved to disk; the Parquet exporter.

Columns are auto-detected (override with the source's ``*_column`` keys):

- a **catalog Parquet** (``image_refs`` plus ``messages`` or ``action``, e.g. our own
  export) is read back as is;
- **images**: ``images`` / ``image`` (``datasets.Image`` structs ``{bytes, path}``, lists
  of them, path strings or raw bytes);
- **conversations**: ``conversations`` (ShareGPT ``from``/``value``) or ``messages``
  (``role``/``content``), normalised exactly like LLaVA JSON (see ``midtrain.data.llava``);
- otherwise **single-turn** text: a prompt column (``question``, ``query``, ``prompt``,
  ``instruction``, ``input``) and a response column (``answer``, ``response``,
  ``output``, ``caption``, ``text``); a caption-only table gives ``user: <image>``,
  ``assistant: <caption>``.

Reading is streamed in small record batches; Parquet row groups and HF Arrow slices with
no wanted rows (sample cap, resume) are not read at all. Errors name ``file:row N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..runs import SampleError, StageError, atomic_path
from .catalog import CATALOG_SCHEMA, rows_to_table
from .llava import conversation_row
from .sources import Item, SampleReader, Selection, checked_image_ref

IMAGE_COLUMNS = ("images", "image")
MESSAGE_COLUMNS = ("conversations", "messages")
PROMPT_COLUMNS = ("question", "query", "prompt", "instruction", "input")
RESPONSE_COLUMNS = ("answer", "response", "output", "caption", "text")
VLA_FIELDS = ("instruction", "episode", "frame", "state", "action", "action_mask")
BATCH_ROWS = 256


@dataclass
class ColumnMap:
    """Which columns of a table play which part of a sample."""

    native: bool
    id: Optional[str]
    images: Optional[str]
    messages: Optional[str]
    prompt: Optional[str]
    response: Optional[str]

    def columns(self, names: list[str]) -> list[str]:
        if self.native:
            return [c for c in names if c in CATALOG_SCHEMA.names or c == self.id]
        return [c for c in (self.id, self.images, self.messages, self.prompt, self.response) if c]


def detect_columns(schema: pa.Schema, source, where: str) -> ColumnMap:
    """Map a table's columns to sample parts; a StageError names the columns and the keys to set."""
    names = list(schema.names)

    def pick(key: str, given: Optional[str], candidates: tuple[str, ...]) -> Optional[str]:
        if given is not None:
            if given not in names:
                raise StageError(f"{where}: {key}: column {given!r} not found; columns: {', '.join(names)}")
            return given
        return next((c for c in candidates if c in names), None)

    id_col = source.id_field if source.id_field in names else None
    explicit = any(getattr(source, k) for k in ("image_column", "messages_column", "prompt_column", "response_column"))
    if not explicit and "image_refs" in names and ("messages" in names or "action" in names):
        return ColumnMap(True, id_col, "image_refs", "messages" if "messages" in names else None, None, None)
    cmap = ColumnMap(
        False,
        id_col,
        pick("image_column", source.image_column, IMAGE_COLUMNS),
        pick("messages_column", source.messages_column, MESSAGE_COLUMNS),
        pick("prompt_column", source.prompt_column, PROMPT_COLUMNS),
        pick("response_column", source.response_column, RESPONSE_COLUMNS),
    )
    if cmap.messages is None and cmap.response is None:
        raise StageError(
            f"{where}: no conversation columns found (columns: {', '.join(names)}); expected one of "
            f"{', '.join(MESSAGE_COLUMNS + RESPONSE_COLUMNS)}, or set messages_column / response_column"
        )
    return cmap


def _image_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _TabularReader(SampleReader):
    """Shared row conversion: one table row -> catalog row or SampleError."""

    cmap: ColumnMap

    def _row(self, rec: dict, index: int, where: str, image_root: Path) -> Item:
        src = self.source
        try:
            if self.cmap.native:
                return self._native_row(rec, index, where, image_root)
            record: dict[str, Any] = {}
            if self.cmap.id:
                record["id"] = rec.get(self.cmap.id)
            if self.cmap.images:
                record["images"] = _image_list(rec.get(self.cmap.images))
            if self.cmap.messages:
                record["conversations"] = rec.get(self.cmap.messages)
            else:
                prompt = rec.get(self.cmap.prompt) if self.cmap.prompt else ""
                response = rec.get(self.cmap.response)
                if response is None or prompt is None:
                    missing = self.cmap.response if response is None else self.cmap.prompt
                    raise SampleError("missing required field", where, str(missing), str(rec.get(self.cmap.id, index)))
                record["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]
            return conversation_row(record, index, where, "id" if self.cmap.id else None, image_root, src)
        except SampleError as err:
            return err

    def _native_row(self, rec: dict, index: int, where: str, image_root: Path) -> dict:
        own = rec.get(self.cmap.id) if self.cmap.id else None
        local_id = str(own) if own not in (None, "") else str(index)
        row = {"id": local_id, "origin": where}
        if rec.get("messages"):
            record = {"messages": rec["messages"], "images": _image_list(rec.get("image_refs"))}
            row.update(conversation_row(record, index, where, None, image_root, self.source))
            row["id"] = local_id
        else:
            if rec.get("action") is None:
                raise SampleError("missing required field", where, "'messages' or 'action'", local_id)
            row["image_refs"] = [
                checked_image_ref(v, image_root, where, local_id, self.source)
                for v in _image_list(rec.get("image_refs"))
            ]
        for key in VLA_FIELDS:
            if rec.get(key) is not None:
                row[key] = _checked_value(rec[key], key, where, local_id)
        row["origin"] = where
        return row

    def _emit(self, batch: pa.RecordBatch, first: int, mask: np.ndarray, where_of, image_root: Path):
        """Rows of ``batch`` (global indices ``first..``) selected by ``mask``.

        A row whose values Arrow cannot turn into Python (e.g. invalid UTF-8 in a string
        column) is a ``malformed row`` of its own; the others are read as usual.
        """
        idx = np.flatnonzero(mask)
        try:
            recs = batch.take(pa.array(idx)).to_pylist()
        except (pa.ArrowException, ValueError):
            recs = []
            for offset in idx:
                try:
                    recs.append(batch.slice(int(offset), 1).to_pylist()[0])
                except (pa.ArrowException, ValueError) as exc:
                    recs.append(SampleError("malformed row", where_of(first + int(offset)), str(exc)))
        for offset, rec in zip(idx, recs):
            index = first + int(offset)
            yield index, rec if isinstance(rec, SampleError) else self._row(rec, index, where_of(index), image_root)


def _checked_value(value: Any, key: str, where: str, sample_id: str) -> Any:
    """A VLA field of a catalog-format row, checked against the catalog column type (``malformed row`` if not).

    Checked per row, so one row with, say, a text ``episode`` is one bad sample rather than
    a failed write of the whole part.
    """
    try:
        pa.array([value], type=CATALOG_SCHEMA.field(key).type)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise SampleError(
            "malformed row", where, f"{key}: {value!r:.60} is not {CATALOG_SCHEMA.field(key).type} ({exc})", sample_id
        ) from None
    return value


class ParquetReader(_TabularReader):
    """One Parquet file or a directory of them (sorted, recursive)."""

    def __init__(self, source, seed: int):
        super().__init__(source, seed)
        root = Path(source.path)
        self.files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
        if not self.files:
            raise StageError(f"{root}: no .parquet files found")
        self.rows = []
        for f in self.files:  # footers only; files are opened one at a time when read
            try:
                self.rows.append(pq.read_metadata(f).num_rows)
            except (pa.ArrowInvalid, OSError) as exc:
                raise StageError(f"{f}: not a readable Parquet file: {exc}") from None
        self.cmap = detect_columns(pq.read_schema(self.files[0]), source, str(self.files[0]))

    def count_records(self, need: bool) -> Optional[int]:
        return sum(self.rows)

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        offset = 0
        for file, rows in zip(self.files, self.rows):
            if not selection.mask(offset, offset + rows).any():
                offset += rows
                continue
            image_root = Path(self.source.image_root) if self.source.image_root else file.parent
            file_offset = offset

            def where_of(index: int, file=file, base=file_offset) -> str:
                return f"{file}:row {index - base}"

            with pq.ParquetFile(file) as pf:
                cols = self.cmap.columns(pf.schema_arrow.names)
                for rg in range(pf.num_row_groups):
                    n = pf.metadata.row_group(rg).num_rows
                    mask = selection.mask(offset, offset + n)
                    if mask.any():
                        yield from self._row_group(pf, rg, cols, offset, mask, where_of, image_root)
                    offset += n

    def _row_group(
        self, pf: pq.ParquetFile, rg: int, cols: list[str], offset: int, mask: np.ndarray, where_of, image_root: Path
    ):
        """The wanted rows of one row group. A row group that cannot be read (a truncated or
        corrupt file) is one bad sample naming the file and its row range, at the position
        of its last wanted row, like a LeRobot episode whose video is unreadable."""
        lo = offset
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=cols):
                m = mask[lo - offset : lo - offset + batch.num_rows]
                if m.any():
                    yield from self._emit(batch, lo, m, where_of, image_root)
                lo += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            wanted = np.flatnonzero(mask[lo - offset :]) + lo
            if len(wanted):
                first, last = where_of(int(wanted[0])), where_of(int(wanted[-1])).rsplit(" ", 1)[-1]
                yield int(wanted[-1]), SampleError(
                    "undecodable Parquet", f"{first}-{last}", f"row group {rg}: {exc}; {len(wanted)} row(s) skipped"
                )


class HFDiskReader(_TabularReader):
    """A ``datasets.Dataset`` / ``DatasetDict`` saved with ``save_to_disk`` (memory-mapped Arrow)."""

    def __init__(self, source, seed: int):
        super().__init__(source, seed)
        import datasets

        root = Path(source.path)
        try:
            ds = datasets.load_from_disk(str(root))
        except FileNotFoundError as exc:
            raise StageError(f"{root}: not a dataset saved with save_to_disk ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            split = source.split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
            if split not in splits:
                raise StageError(f"{root}: split: choose one of {', '.join(splits)} (got {source.split!r})")
            ds, self.label = ds[split], f"{root}[{split}]"
        else:
            self.label = str(root)
        if ds._indices is not None:  # a selected/shuffled view: materialise the order
            ds = ds.flatten_indices()
        self.table: pa.Table = ds.data.table
        self.cmap = detect_columns(self.table.schema, source, self.label)
        self.root = root

    def count_records(self, need: bool) -> Optional[int]:
        return self.table.num_rows

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        image_root = Path(self.source.image_root) if self.source.image_root else self.root
        table = self.table.select(self.cmap.columns(self.table.schema.names))
        for lo in range(0, table.num_rows, BATCH_ROWS):
            n = min(BATCH_ROWS, table.num_rows - lo)
            mask = selection.mask(lo, lo + n)
            if mask.any():
                batch = table.slice(lo, n).combine_chunks().to_batches()[0]
                yield from self._emit(batch, lo, mask, lambda i: f"{self.label}:row {i}", image_root)


# --------------------------------------------------------------------------- export


def catalog_hf_features():
    """``datasets.Features`` of the catalog schema, so exported Parquet loads with decoded images."""
    from datasets import Features, Image, List, Value

    return Features(
        {
            "id": Value("string"), "source": Value("string"), "kind": Value("string"),
            "image_refs": List(Image()),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "instruction": Value("string"), "episode": Value("int64"), "frame": Value("int64"),
            "state": List(Value("float32")), "action": List(List(Value("float32"))),
            "action_mask": List(Value("bool")), "origin": Value("string"), "content_hash": Value("string"),
        }
    )  # fmt: skip


def export_schema() -> pa.Schema:
    """The catalog schema as ``datasets`` lays it out (image structs ``{bytes, path}``), with its metadata.

    ``datasets`` only trusts its feature metadata when the Arrow types match exactly, so
    the export uses HF's struct field order; the columns and values are the catalog's.
    """
    return catalog_hf_features().arrow_schema


def _embed(table: pa.Table) -> pa.Table:
    """Replace path image refs by their file bytes (self-contained export)."""
    refs = table.column("image_refs").to_pylist()
    for i, lst in enumerate(refs):
        for ref in lst or []:
            if ref.get("bytes") is None and ref.get("path"):
                path = Path(ref["path"])
                if not path.is_file():
                    raise SampleError("missing image file", str(table.column("id")[i]), str(path))
                ref["bytes"], ref["path"] = path.read_bytes(), path.name
    idx = table.schema.get_field_index("image_refs")
    return table.set_column(idx, "image_refs", pa.array(refs, type=CATALOG_SCHEMA.field("image_refs").type))


def write_catalog_parquet(
    rows_or_tables: Iterable[dict | pa.Table | pa.RecordBatch],
    out_path: Path | str,
    embed_images: bool = False,
    row_group_size: int = 1024,
) -> int:
    """Stream catalog rows (dicts) or tables/batches into one Parquet file, atomically.

    The file has the catalog schema plus Hugging Face feature metadata, so
    ``datasets.load_dataset("parquet", data_files=...)`` decodes ``image_refs`` as images.
    ``embed_images`` copies image files into the Parquet (``path`` keeps the file name),
    making the export self-contained. Returns the number of rows written.
    """
    schema = export_schema()
    written = 0
    buffer: list[dict] = []
    with atomic_path(out_path) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        try:

            def flush(table: pa.Table) -> None:
                nonlocal written
                table = table.select(CATALOG_SCHEMA.names).cast(CATALOG_SCHEMA)
                if embed_images:
                    table = _embed(table)
                writer.write_table(table.cast(schema), row_group_size=row_group_size)
                written += table.num_rows

            for item in rows_or_tables:
                if isinstance(item, dict):
                    buffer.append(item)
                    if len(buffer) >= row_group_size:
                        flush(rows_to_table(buffer))
                        buffer = []
                    continue
                if buffer:
                    flush(rows_to_table(buffer))
                    buffer = []
                table = pa.Table.from_batches([item]) if isinstance(item, pa.RecordBatch) else item
                flush(_fill_missing_columns(table))
            if buffer:
                flush(rows_to_table(buffer))
        finally:
            writer.close()
    return written


def _fill_missing_columns(table: pa.Table) -> pa.Table:
    for field in CATALOG_SCHEMA:
        if field.name not in table.schema.names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table
