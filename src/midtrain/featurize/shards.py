"""Shards of the catalog and token-length-bucketed batches within a shard.

Shard ``k`` is catalog rows ``[k * shard_size, (k + 1) * shard_size)`` in catalog order
(``catalog_files`` order, then row order), whatever the backend, the number of workers or how
often the run was interrupted; so a resumed run recomputes exactly the missing shards and its
output equals an uninterrupted run. Rows are read by Parquet row group, so reading one shard
costs the row groups it overlaps, not the file before it.

Within a shard, rows are sorted by a cheap token-length estimate (text characters, known image
token count) and cut into batches under a row cap and a padded-token budget, so padding stays
small; features are put back in catalog order when the shard is written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.catalog import catalog_files

# Columns the featurizer reads (state/action columns of VLA frames are not needed).
FEATURIZE_COLUMNS = ["id", "source", "kind", "image_refs", "messages", "instruction", "origin"]

CHARS_PER_TOKEN = 3.5  # English BPE; only used to order and budget batches
TEMPLATE_TOKENS = 16  # chat-template overhead per sample (role headers, system prompt)
TOKENS_PER_TURN = 4


@dataclass(frozen=True)
class RowGroupRef:
    path: Path
    index: int
    start: int  # global row index of the row group's first row
    rows: int


@dataclass(frozen=True)
class CatalogIndex:
    """Row-group layout of a catalog directory, from Parquet footers only (no data read)."""

    root: Path
    row_groups: tuple[RowGroupRef, ...]
    num_rows: int

    @classmethod
    def open(cls, catalog_dir: Path | str) -> "CatalogIndex":
        groups, start = [], 0
        for path in catalog_files(catalog_dir):
            meta = pq.ParquetFile(path).metadata
            for i in range(meta.num_row_groups):
                n = meta.row_group(i).num_rows
                groups.append(RowGroupRef(path, i, start, n))
                start += n
        return cls(Path(catalog_dir), tuple(groups), start)

    def shard_ranges(self, shard_size: int) -> list[tuple[int, int]]:
        """``[(start, end)]`` global row ranges of every shard."""
        return [(s, min(s + shard_size, self.num_rows)) for s in range(0, self.num_rows, shard_size)]

    def read_rows(self, start: int, end: int, columns: list[str] | None = None) -> pa.Table:
        """Rows ``[start, end)`` of the catalog as one table (reads only overlapping row groups)."""
        pieces = []
        for g in self.row_groups:
            if g.start + g.rows <= start or g.start >= end:
                continue
            table = pq.ParquetFile(g.path).read_row_group(g.index, columns=columns)
            lo, hi = max(start, g.start) - g.start, min(end, g.start + g.rows) - g.start
            pieces.append(table.slice(lo, hi - lo))
        if not pieces:
            raise ValueError(f"{self.root}: rows [{start}, {end}) are outside the catalog ({self.num_rows} rows)")
        return pa.concat_tables(pieces, promote_options="default") if len(pieces) > 1 else pieces[0]


def _sum_per_row(values: np.ndarray, parents: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(parents, weights=values, minlength=n) if len(parents) else np.zeros(n)


ImageTokens = Union[int, Callable[[list], np.ndarray]]


def image_sizes(table: pa.Table) -> tuple[np.ndarray, list]:
    """``(row index per image, [(height, width) or None per image])`` read from image headers only
    (no decoding: tens of microseconds per image). None where the header is unreadable; that image
    fails properly, with a reason, when the batch is built."""
    from PIL import Image

    refs = table.column("image_refs").combine_chunks()
    flat = pc.list_flatten(refs)
    parents = pc.list_parent_indices(refs).to_numpy()
    sizes: list = []
    for data, path in zip(flat.field("bytes").to_pylist(), flat.field("path").to_pylist()):
        try:
            with Image.open(io.BytesIO(data) if data is not None else path) as img:
                sizes.append((img.height, img.width))
        except Exception:  # noqa: BLE001 - only an estimate
            sizes.append(None)
    return parents, sizes


class ImageTokenCounter:
    """Tokens one image of a given size expands to, asked from the processor once per distinct size.

    Dynamic-resolution models (Qwen-VL: 64 tokens for a 224 px image, over 1000 for a large photo)
    and tiling processors (Idefics3, InternVL) make the image size the biggest term of a sample's
    length, so batching by it keeps padding small. Falls back to a nominal count when the
    processor cannot say.
    """

    def __init__(self, processor):
        self.processor = processor
        self.nominal = nominal_image_tokens(processor)
        self.cache: dict[tuple[int, int], int] = {}

    def __call__(self, sizes: list) -> np.ndarray:
        missing = sorted({s for s in sizes if s is not None and s not in self.cache})
        if missing:
            try:
                data = self.processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in missing])
                counts = data["num_image_tokens"] if isinstance(data, dict) else data.num_image_tokens
                self.cache.update((s, max(1, int(c))) for s, c in zip(missing, counts))
            except Exception:  # noqa: BLE001 - an estimate only
                self.cache.update((s, self.nominal) for s in missing)
        return np.array([self.cache.get(s, self.nominal) if s is not None else self.nominal for s in sizes], dtype=np.float64)


def estimate_tokens(table: pa.Table, image_tokens: ImageTokens, include_assistant: bool = True) -> np.ndarray:
    """Approximate token count per row, vectorised over the Arrow columns where it can be.

    ``chars / 3.5 + image tokens + template overhead``; ``image_tokens`` is a constant per image
    or an :class:`ImageTokenCounter` (tokens from each image's size). Good enough to sort rows
    into batches of similar length; the exact length comes from the processor.
    """
    n = table.num_rows
    est = np.full(n, float(TEMPLATE_TOKENS))
    if "messages" in table.column_names:
        messages = table.column("messages").combine_chunks()
        flat = pc.list_flatten(messages)
        if len(flat):
            parents = pc.list_parent_indices(messages).to_numpy()
            chars = pc.fill_null(pc.utf8_length(flat.field("content")), 0).to_numpy().astype(np.float64)
            if not include_assistant:
                is_answer = pc.fill_null(pc.equal(flat.field("role"), "assistant"), False).to_numpy(zero_copy_only=False)
                chars = np.where(is_answer, 0.0, chars)
            est += _sum_per_row(chars / CHARS_PER_TOKEN + TOKENS_PER_TURN, parents, n)
    if "instruction" in table.column_names:
        est += pc.fill_null(pc.utf8_length(table.column("instruction")), 0).to_numpy().astype(np.float64) / CHARS_PER_TOKEN
    if "image_refs" in table.column_names:
        if callable(image_tokens):
            parents, sizes = image_sizes(table)
            est += _sum_per_row(image_tokens(sizes), parents, n)
        else:
            n_images = pc.fill_null(pc.list_value_length(table.column("image_refs")), 0).to_numpy()
            est += n_images * float(image_tokens)
    return np.ceil(est).astype(np.int64)


def plan_batches(token_estimates: np.ndarray, batch_size: int, max_tokens_per_batch: int,
                 groups: np.ndarray | None = None) -> list[np.ndarray]:  # fmt: skip
    """Row indices per batch: rows sorted by length, each batch at most ``batch_size`` rows and at most
    ``max_tokens_per_batch`` padded tokens (rows x longest row); a row longer than the budget is
    alone in its batch. Rows of different ``groups`` (e.g. with / without images) never share a
    batch, so how a sample is processed does not depend on its neighbours. Deterministic."""
    groups = np.zeros(len(token_estimates), dtype=np.int64) if groups is None else np.asarray(groups)
    order = np.lexsort((token_estimates, groups))  # by group, then length; stable
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        end = start + 1
        while (
            end < n
            and end - start < batch_size
            and groups[order[end]] == groups[order[start]]
            and (end - start + 1) * token_estimates[order[end]] <= max_tokens_per_batch
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def image_groups(table: pa.Table) -> np.ndarray:
    """1 for rows with images, 0 for text-only rows (batched apart: some processors, e.g.
    PaliGemma's, accept a text-only sample only next to samples with images)."""
    if "image_refs" not in table.column_names:
        return np.zeros(table.num_rows, dtype=np.int64)
    return (pc.fill_null(pc.list_value_length(table.column("image_refs")), 0).to_numpy() > 0).astype(np.int64)


def nominal_image_tokens(processor, image_size: tuple[int, int] = (448, 448)) -> int:
    """Tokens one image expands to at a nominal size, asked from the processor (fallback: 256)."""
    try:
        data = processor._get_num_multimodal_tokens(image_sizes=[list(image_size)])
        tokens = data["num_image_tokens"][0] if isinstance(data, dict) else data.num_image_tokens[0]
        return max(1, int(tokens))
    except Exception:  # noqa: BLE001 - an estimate only
        for attr in ("image_seq_len", "image_seq_length"):
            if isinstance(getattr(processor, attr, None), int):
                return int(getattr(processor, attr))
        return 256
