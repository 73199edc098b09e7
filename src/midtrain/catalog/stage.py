"""The ``catalog`` stage: read every configured dataset source into the sample catalog.

Output: ``<run>/catalog/<source>/part-NNNNN.parquet`` (``CATALOG_SCHEMA``; a source folder
holds its rows alone, so ``pd.read_parquet(<run>/catalog/<source>)`` reads exactly them), parts of
``rows_per_part`` rows written in row groups of ``row_group_size`` rows, so memory is
bounded by one row group whatever the dataset size. Each part is written atomically and
marked done (shard ``<source>.part-NNNNN``, recording where in the source stream it
ended); an interrupted run resumes after the last done part, and a finished source
(shard ``<source>.complete``) is not read again.

Ids are ``<source>/<local id>``: the record's own id (``id_field``) or its index; for
LeRobot frames ``<episode>/<frame>``. Duplicate ids within a source are an error naming
both records. Bad samples follow ``on_error``; a source with no samples at all is an
"empty dataset" error (or a recorded skip). Manifest ``sources`` holds, per source,
``kind``, ``format``, ``path``, ``read``, ``written``, ``skipped`` and ``parts``.

Content, not names, decides "nothing to do": every row carries a ``content_hash`` and
every part a ``references/<source>/references-NNNNN.parquet`` of the files its rows name (see
``midtrain.data.content``). A rerun of a complete catalog whose referenced files changed
reads its sources again (manifest ``rerun_because``); so does a resumed source whose done
parts reference changed files.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.catalog import CATALOG_SCHEMA, empty_answer, rows_to_table
from ..data.content import RowHasher, changed_references
from ..data.readers import open_reader
from ..data.sources import DatasetSource
from ..runs import (
    RunDir, SampleError, StageError, StageRun, atomic_path, foreign_files, stage_run, write_parquet_atomic,
)  # fmt: skip
from .config import CatalogConfig

STAGE = "catalog"
REFERENCES = "references"  # <run>/catalog/references/<source>/: the files each part's rows name (a reserved source name)


def _part_name(source: str, part: int) -> str:
    return f"{source}.part-{part:05d}"


@dataclass
class SourceTally:
    read: int = 0
    written: int = 0
    skipped: int = 0
    parts: int = 0

    def add(self, info: dict) -> None:
        self.read += info.get("read", 0)
        self.written += info.get("rows", 0)
        self.skipped += info.get("skipped", 0)
        self.parts += 1 if info.get("rows", 0) else 0


def _write_part(
    st: StageRun, cfg: CatalogConfig, src: DatasetSource, items: Iterator, part: int, bar
) -> tuple[dict, bool]:
    """Consume ``items`` until ``rows_per_part`` rows are written or the source ends.

    Returns (``.done`` info, source exhausted). The part file appears only if it has rows.
    """
    path = st.dir / src.name / f"part-{part:05d}.parquet"
    info = {"rows": 0, "read": 0, "skipped": 0, "next_position": None}
    hasher = RowHasher(cfg.verify_references)
    exhausted = True
    buffer: list[dict] = []
    with contextlib.ExitStack() as stack:
        writer: Optional[pq.ParquetWriter] = None

        def flush() -> None:
            nonlocal writer
            if writer is None:
                tmp = stack.enter_context(atomic_path(path))
                writer = pq.ParquetWriter(tmp, CATALOG_SCHEMA)
                stack.callback(writer.close)
            writer.write_table(rows_to_table(buffer), row_group_size=cfg.row_group_size)
            buffer.clear()

        for position, item in items:
            samples = item.samples if isinstance(item, SampleError) else 1
            info["read"] += samples
            info["next_position"] = position + 1
            bar.update(samples)
            if isinstance(item, SampleError):
                if item.sample_id is not None:
                    item.sample_id = f"{src.name}/{item.sample_id}"
                st.handle(item)
                info["skipped"] += samples
                continue
            if empty_answer(item.get("messages")):
                st.handle(SampleError("empty answer", item.get("origin") or str(item["id"]), "every assistant turn is empty",
                                      f"{src.name}/{item['id']}"))  # fmt: skip
                info["skipped"] += 1
                continue
            item["id"] = f"{src.name}/{item['id']}"
            item["source"], item["kind"] = src.name, src.kind
            item["content_hash"] = hasher(item)
            buffer.append(item)
            info["rows"] += 1
            if len(buffer) >= cfg.row_group_size:
                flush()
            if info["rows"] >= cfg.rows_per_part:
                exhausted = False
                break
        if buffer:
            flush()
    if info["rows"]:
        write_parquet_atomic(_references_path(st, src, part), hasher.references())
    return info, exhausted


def _references_path(st: StageRun, src: DatasetSource, part: int) -> Path:
    return st.dir / REFERENCES / src.name / f"references-{part:05d}.parquet"


def _references_changed(tables: list[Path], cfg: CatalogConfig) -> Optional[dict]:
    """``rerun_because`` for the manifest if any file these reference tables name has changed."""
    checked, changed, examples = changed_references(tables, cfg.verify_references)
    return {"changed_references": changed, "of": checked, "examples": examples} if changed else None


class _ReferencesChanged(Exception):
    """Done parts of an interrupted run name files that changed since: start over (forced)."""

    def __init__(self, because: dict):
        super().__init__(f"referenced files changed since the interrupted run's done parts were written: {because}")
        self.because = because


def _check_unique_ids(out_dir: Path, src: DatasetSource, index: int) -> None:
    """Ids must be unique in a source; a duplicate names both records and the fix."""
    parts = sorted(out_dir.glob("part-*.parquet"))
    if not parts:
        return
    ids = pa.concat_tables([pq.read_table(p, columns=["id"]) for p in parts]).column("id")
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup) == 0:
        return
    first = dup[0]["values"].as_py()
    origins = []
    for p in parts:
        t = pq.read_table(p, columns=["id", "origin"], filters=[("id", "=", first)])
        origins += t.column("origin").to_pylist()
    raise StageError(
        f"{src.path}: duplicate sample id {first!r} ({len(dup)} duplicated id(s)) at {origins[0]} and {origins[1]}; "
        f"ids must be unique within a source - set datasets[{index}].id_field: null to number records instead"
    )


def _build_source(st: StageRun, cfg: CatalogConfig, src: DatasetSource, index: int) -> dict:
    """Read one source into its parts (resuming after done parts); returns its manifest entry."""
    complete = f"{src.name}.complete"
    summary = {"kind": src.kind, "format": src.format, "path": str(src.path)}
    because = _references_changed(sorted((st.dir / REFERENCES / src.name).glob("references-*.parquet")), cfg)
    if because:
        raise _ReferencesChanged(because)
    if st.shard_done(complete):
        info = st.shard_info(complete)
        st.counts["read"] += info["read"]
        st.counts["written"] += info["written"]
        st.log.info("source %s: already complete (%d rows)", src.name, info["written"])
        return {**summary, **info}

    tally = SourceTally()
    part, start = 0, 0
    while st.shard_done(_part_name(src.name, part)):
        info = st.shard_info(_part_name(src.name, part))
        tally.add(info)
        start = info["next_position"] if info["next_position"] is not None else start
        part += 1
    if part:
        st.log.info("source %s: resuming after %d done part(s) at position %d", src.name, part, start)

    seed = src.seed if src.seed is not None else cfg.seed
    st.current_shard = _part_name(src.name, part)
    reader = open_reader(src, seed)
    selection, total = reader.selection(start)
    items = ((selection.position(r), item) for r, item in reader.records(selection))
    with st.timed(f"read:{src.name}"), st.progress(
        total=selection.expected(total), desc=f"catalog {src.name}", unit="sample"
    ) as bar:
        while True:
            name = _part_name(src.name, part)
            st.current_shard = name
            info, exhausted = _write_part(st, cfg, src, items, part, bar)
            if info["rows"] or info["read"]:
                st.mark_shard_done(name, info)
                tally.add(info)
            if exhausted:
                break
            part += 1

    st.current_shard = complete
    if tally.read == 0:
        st.skip("empty dataset", str(src.path), f"source {src.name!r} ({src.format}) has no samples")
        tally.skipped += 1
    if src.format != "lerobot":
        _check_unique_ids(st.dir / src.name, src, index)
    info = {"read": tally.read, "written": tally.written, "skipped": tally.skipped, "parts": tally.parts}
    st.mark_shard_done(complete, info)
    st.counts["read"] += tally.read
    st.counts["written"] += tally.written
    st.log.info("source %s: %d read, %d written, %d skipped", src.name, tally.read, tally.written, tally.skipped)
    return {**summary, **info}


def _changed_since_complete(run_dir: RunDir, config: CatalogConfig) -> Optional[dict]:
    """Whether the files named by a complete catalog with this config changed since it was built.

    Its inputs' hashes cover the data files; this covers what they reference. ``None``
    when there is no such catalog or nothing it references changed.
    """
    prev = run_dir.manifest(STAGE)
    if not prev or prev.get("status") != "complete":
        return None
    if prev.get("config") != json.loads(json.dumps(config.to_dict(), default=str)):
        return None  # a different config reruns anyway
    return _references_changed(sorted((run_dir.stage_dir(STAGE) / REFERENCES).glob("*/references-*.parquet")), config)


def build_catalog(config: CatalogConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run the catalog stage; returns ``<run>/catalog``.

    Reads the sources again (as if forced) when files that a complete catalog, or the done
    parts of an interrupted one, reference have changed since.
    """
    for i, src in enumerate(config.datasets):
        if not Path(src.path).exists():
            raise StageError(f"datasets[{i}].path: {src.path} not found (source {src.name!r})")
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    because = None if force else _changed_since_complete(run_dir, config)
    try:
        return _build(config, run_dir, force or _rebuild(run_dir, because), because)
    except _ReferencesChanged as exc:
        return _build(config, run_dir, _rebuild(run_dir, exc.because), exc.because)


def _rebuild(run_dir: RunDir, because: Optional[dict]) -> bool:
    """Whether to read the sources again, from scratch (a forced run), because references changed.

    A forced run replaces the catalog folder whole, so files in it that midtrain did not
    write are refused by name here, as the swap would refuse them, rather than deleted.
    """
    if because is None:
        return False
    foreign = foreign_files(run_dir.stage_dir(STAGE))
    if foreign:
        raise StageError(
            f"{run_dir.stage_dir(STAGE)}: {because['changed_references']} referenced file(s) changed (e.g. "
            f"{because['examples'][0]}), so the catalog must be rebuilt, but it holds files midtrain did not write "
            f"({', '.join(foreign[:5])}); move them out and rerun, or rerun with --force to delete them"
        )
    return True


def _build(config: CatalogConfig, run_dir: RunDir, force: bool, rerun_because: Optional[dict]) -> Path:
    inputs = {str(Path(src.path).resolve()): src.path for src in config.datasets}
    with stage_run(run_dir, STAGE, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        st.extra["reference_fingerprints"] = "content" if config.verify_references else "stat"
        if rerun_because:
            st.extra["rerun_because"] = rerun_because
            st.log.info("referenced files changed since they were read (%s): reading the sources again", rerun_because)
        sources = {}
        for i, src in enumerate(config.datasets):
            sources[src.name] = _build_source(st, config, src, i)
            st.extra["sources"] = sources
            st.write_manifest("running")
        st.extra["num_rows"] = sum(s["written"] for s in sources.values())
        if st.extra["num_rows"] == 0:
            raise StageError(f"{st.dir}: no samples were written from any source; see {st.dir / 'errors.jsonl'}")
    return st.dir
