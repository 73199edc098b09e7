"""``midtrain export``: write the selected mixture in the formats trainers read.

Outputs in ``export/``::

    mixture.json | mixture.jsonl   LLaVA / ShareGPT records (``id``, ``image``,
                                   ``conversations`` with ``from``/``value``) - read by
                                   LLaMA-Factory and the Qwen-VL fine-tuning scripts
    images/                        the records' images (copied, linked or referenced)
    dataset_info.json              LLaMA-Factory entry ``<dataset_name>`` (sharegpt)
    mixture.parquet                catalog rows of the mixture (HF ``datasets`` loadable)

Records follow catalog order (trainers shuffle). The selected ids are checked against
the catalog: an id the catalog does not hold means the selection came from another run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.catalog import iter_catalog_with_ids
from ..data.llava import write_llava_json
from ..data.tabular import write_catalog_parquet
from ..runs import RunDir, SampleError, StageError, StageRun, stage_run
from ..select.stage import SELECTION_FILE
from .config import ExportConfig


def selected_ids(selection_path: Path) -> pa.Array:
    if not selection_path.exists():
        raise StageError(f"{selection_path}: selection not found; run `midtrain select` first")
    table = pq.read_table(selection_path, columns=["id", "selected"])
    ids = table.filter(table.column("selected")).column("id").combine_chunks()
    if len(ids) == 0:
        raise StageError(f"{selection_path}: no sample is selected")
    return ids


def _check_against_catalog(catalog_dir: Path, ids: pa.Array, selection_path: Path) -> None:
    found, wrong_kind = [], []
    for sub in iter_catalog_with_ids(catalog_dir, ids, columns=["id", "kind"]):
        found.append(sub.column("id"))
        wrong_kind += [i for i, k in zip(sub.column("id").to_pylist(), sub.column("kind").to_pylist()) if k != "vlm"]
    have = pa.chunked_array(found, type=pa.string()) if found else pa.chunked_array([], type=pa.string())
    missing = np.flatnonzero(~pc.is_in(ids, value_set=have.combine_chunks()).to_numpy(zero_copy_only=False))
    if len(missing):
        raise StageError(
            f"{selection_path}: {len(missing)} selected id(s) are not in the catalog {catalog_dir} (first: {ids[int(missing[0])]}); "
            "the selection comes from another run - re-run score and select in this run directory"
        )
    if wrong_kind:
        raise StageError(f"{selection_path}: selected id {wrong_kind[0]} is a VLA frame, not a VLM sample; re-run select")


def _checked_rows(st: StageRun, batches: Iterator[pa.RecordBatch], image_mode: str) -> Iterator[dict]:
    """Catalog rows, with unusable samples (missing image files) raised or recorded as skips."""
    for batch in batches:
        for row in batch.to_pylist():
            where = row.get("origin") or f"catalog id {row['id']}"
            try:
                if not row.get("messages"):
                    raise SampleError("no conversation", where, "only VLM samples with messages can be exported", row["id"])
                if image_mode != "reference":
                    for ref in row.get("image_refs") or []:
                        if ref.get("bytes") is None and not (ref.get("path") and Path(ref["path"]).is_file()):
                            raise SampleError("missing image file", where, str(ref.get("path")), row["id"])
            except SampleError as err:
                st.handle(err)
                continue
            yield row


def export_mixture(config: ExportConfig, run_dir: RunDir, force: bool = False) -> Path:
    selection_path = Path(config.selection) if config.selection is not None else run_dir.require("select") / SELECTION_FILE
    catalog_dir = run_dir.require("catalog")
    with stage_run(run_dir, "export", config, inputs=[selection_path, catalog_dir / "manifest.json"], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        ids = selected_ids(selection_path)
        st.counts["read"] = len(ids)
        with st.timed("check"):
            _check_against_catalog(catalog_dir, ids, selection_path)
        out_json = st.dir / f"mixture.{config.format}"
        with st.timed("json"):
            counts = write_llava_json(
                _checked_rows(st, iter_catalog_with_ids(catalog_dir, ids), config.image_mode), out_json,
                st.dir / "images", image_mode=config.image_mode, llamafactory_name=config.dataset_name,
            )  # fmt: skip
        st.counts["written"] = counts["records"]
        st.counts["images"] = counts["images"]
        if config.parquet:
            kept = ids
            if st.skipped:  # the Parquet holds the same records as the JSON
                skipped = {json.loads(line)["id"] for line in (st.dir / "errors.jsonl").read_text().splitlines()}
                kept = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=pa.array(sorted(skipped), type=pa.string()))))
            with st.timed("parquet"):
                st.counts["parquet_rows"] = write_catalog_parquet(
                    iter_catalog_with_ids(catalog_dir, kept), st.dir / "mixture.parquet", embed_images=config.embed_images
                )
        st.extra.update({"files": sorted(p.name for p in st.dir.iterdir() if p.is_file() and not p.name.startswith(".")),
                         "dataset_name": config.dataset_name, "image_root": str(st.final_dir)})  # fmt: skip
        st.log.info("exported %d samples (%d images) to %s", counts["records"], counts["images"], out_json)
    return st.dir
