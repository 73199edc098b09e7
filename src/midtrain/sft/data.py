"""Training data of ``midtrain sft``: the inputs, the drawn composition, and the batches.

Once per run, on the main process (a resumed run and the other processes reuse the result):

1. **Inputs** become catalog-schema Parquet files: the export stage's ``mixture.parquet``,
   catalog sources, or dataset files read with the catalog's readers (written to
   ``data/inputs/``). Every row has a ``source``.
2. **Draw.** Each source's rows are visited in a seeded permutation
   (``numpy.random.default_rng([seed, blake2b(source)])``). Visited rows are encoded with the
   model's own processor and chat template (:func:`midtrain.models.inputs.build_batch` with
   answer masks) to measure their token length and answer tokens; rows that cannot be used
   (missing image, over-long with ``overlong: skip``, an answer truncated away, ...) follow
   ``on_error`` and are replaced by the next in the permutation. Without a budget every row is
   used, ``val_fraction`` of each source held out first; with ``mixture.budget`` the source gets
   its share (largest-remainder rounding of ``budget x weight``) of samples or tokens, and then
   ``val_fraction`` of its training draw more for validation. Reading is one streaming pass
   over the files per round, touching only the row groups that hold visited rows.
3. **Artefacts** (``data/``): ``pool.arrow`` (the encoded rows, Arrow IPC, memory-mapped for
   random access), ``samples.parquet`` (``pool_row, split, source, id, length, answer_tokens,
   truncated``: the training set in a canonical order, then the validation set) and
   ``composition.json`` (per source: weight, share asked, samples and tokens drawn, validation
   samples, rows visited, skipped by reason), written last.

Batches: :func:`collate_sft` runs ``build_batch`` again on the rows of a micro-batch (right
padding, same truncation) and sets ``labels`` = input ids on answer tokens of every assistant
turn, -100 elsewhere (prompt, image and padding tokens), as LLaMA-Factory's supervised
template does.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from ..data.catalog import CATALOG_SCHEMA, catalog_files, empty_answer, rows_to_table
from ..models.forward import IGNORE
from ..models.inputs import build_batch
from ..seeding import keyed_rng
from ..runs import SampleError, StageError, write_json_atomic, write_parquet_atomic
from .vla_text import render_vla_as_text

ENCODE_ROWS = 32  # rows per processor call while measuring lengths
POOL_BATCH_ROWS = 256  # rows per record batch of pool.arrow
DATA_DIR = "data"
POOL_FILE = "pool.arrow"
SAMPLES_FILE = "samples.parquet"
COMPOSITION_FILE = "composition.json"


# --------------------------------------------------------------------------- inputs


@dataclass
class InputIndex:
    """The input rows: files, each file's row offset, and every row's source."""

    files: list[Path]
    offsets: np.ndarray  # [len(files) + 1] cumulative row counts
    sources: np.ndarray  # [rows] source name per global row id
    kinds: dict[str, set]

    @classmethod
    def build(cls, files: list[Path]) -> "InputIndex":
        offsets, sources, kinds = [0], [], {}
        for f in files:
            t = pq.read_table(f, columns=["source", "kind"])
            src = t.column("source").to_numpy(zero_copy_only=False).astype(object)
            sources.append(src)
            offsets.append(offsets[-1] + len(src))
            for s, k in zip(src, t.column("kind").to_pylist()):
                kinds.setdefault(s, set()).add(k)
        return cls(files, np.array(offsets), np.concatenate(sources) if sources else np.zeros(0, object), kinds)

    def rows_of(self, source: str) -> np.ndarray:
        return np.flatnonzero(self.sources == source)


def materialize_datasets(datasets, seed: int, out_dir: Path, st) -> list[Path]:
    """Read dataset files with the catalog readers into ``out_dir/<name>.parquet`` (bad records: on_error)."""
    from ..data.readers import open_reader

    files = []
    for src in datasets:
        path = out_dir / f"{src.name}.parquet"
        rows = []
        for _, item in open_reader(src, src.seed if src.seed is not None else seed).iter_samples():
            if isinstance(item, SampleError):
                st.handle(item)
                continue
            rows.append({**item, "id": f"{src.name}/{item['id']}", "source": src.name, "kind": src.kind})
        if not rows:
            raise StageError(f"datasets: {src.path}: no usable sample (source {src.name!r})")
        write_parquet_atomic(path, rows_to_table(rows))
        files.append(path)
    return files


def catalog_source_files(catalog: Path, sources: list[str]) -> list[Path]:
    parts = catalog_files(catalog)
    have = sorted({p.parent.name for p in parts})
    files = []
    for s in sources:
        found = [p for p in parts if p.parent.name == s]
        if not found:
            raise StageError(f"sources: {s!r} is not a source of the catalog {catalog}; its sources: {', '.join(have)}")
        files += found
    return files


# --------------------------------------------------------------------------- the draw


def source_order(seed: int, source: str, n: int) -> np.ndarray:
    """The seeded visiting order of a source's ``n`` rows (independent of the other sources)."""
    return keyed_rng(seed, source, hash="blake2b").permutation(n)


def allocate(weights: dict[str, float], budget: int) -> dict[str, int]:
    """Split ``budget`` over sources in proportion to ``weights``, rounding by largest remainder
    (the parts sum to ``budget`` exactly)."""
    total = sum(weights.values())
    exact = {s: budget * w / total for s, w in weights.items()}
    out = {s: int(math.floor(v)) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: (out[s] - exact[s], s))[: budget - sum(out.values())]:
        out[s] += 1
    return out


@dataclass
class Encoded:
    """What encoding one row gave: its row (rendered), token length, answer tokens, truncation; or an error."""

    rid: int
    row: Optional[dict] = None
    length: int = 0
    answer_tokens: int = 0
    truncated: bool = False
    error: Optional[dict] = None


def encode_rows(rows: list[tuple[int, dict]], processor, max_length: int, overlong: str) -> list[Encoded]:
    """Measure rows with the processor (as training will batch them); rows that cannot train get an
    error. Rows with and without images are processed apart, so that a processor that needs an
    image per prompt (PaliGemma) rejects a text-only row here as it would in a text-only batch."""
    empty = [Encoded(rid, error=_error_dict(SampleError("empty answer", row.get("origin") or row["id"],
                                                        "every assistant turn is empty", row["id"])))
             for rid, row in rows if empty_answer(row.get("messages"))]  # fmt: skip
    rows = [r for r in rows if not empty_answer(r[1].get("messages"))]
    with_images = [r for r in rows if r[1].get("image_refs")]
    text_only = [r for r in rows if not r[1].get("image_refs")]
    return empty + [e for group in (with_images, text_only) if group for e in _encode_group(group, processor, max_length, overlong)]


def _encode_group(rows: list[tuple[int, dict]], processor, max_length: int, overlong: str) -> list[Encoded]:
    out = []
    batch, info = build_batch([r for _, r in rows], processor, max_length=max_length, overlong=overlong, answer_mask=True)
    errors = {e.sample_id: e for e in info.errors}
    ok = {}
    if batch is not None:
        answer = info.answer_mask.sum(1).tolist()
        for j, pos in enumerate(info.positions.tolist()):
            ok[pos] = (int(info.lengths[j]), int(answer[j]), bool(info.truncated[j]))
    for pos, (rid, row) in enumerate(rows):
        if pos in ok:
            length, n_answer, truncated = ok[pos]
            if n_answer == 0:
                detail = f"the answer was truncated away by max_length {max_length}" if truncated else "empty answer"
                err = SampleError("no answer tokens", row.get("origin") or row["id"], detail, row["id"])
                out.append(Encoded(rid, error=_error_dict(err)))
            else:
                out.append(Encoded(rid, row, length, n_answer, truncated))
        else:
            err = errors.get(row["id"]) or SampleError("processor rejected the sample", row.get("origin") or row["id"], "", row["id"])
            out.append(Encoded(rid, error=_error_dict(err)))
    return out


def _error_dict(e: SampleError) -> dict:
    return {"reason": e.reason, "where": e.where, "detail": e.detail, "sample_id": e.sample_id}


class _EncodeStream(IterableDataset):
    """An iterable dataset over the row groups that hold wanted rows: reads them, renders VLA rows
    as text when asked, and encodes them in chunks. DataLoader workers split the row groups."""

    def __init__(self, index: InputIndex, wanted: np.ndarray, processor, max_length: int, overlong: str,
                 vla_as_text: bool, action_bins: int, action_range: tuple[float, float]):  # fmt: skip
        self.tasks = []  # (file, row group, [(rid, row in group)])
        wanted = np.sort(wanted)
        for f, path in enumerate(index.files):
            lo, hi = index.offsets[f], index.offsets[f + 1]
            here = wanted[(wanted >= lo) & (wanted < hi)]
            if not len(here):
                continue
            md = pq.ParquetFile(path).metadata
            starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
            groups = np.searchsorted(starts, here - lo, side="right") - 1
            for g in np.unique(groups):
                sel = here[groups == g]
                self.tasks.append((str(path), int(g), [(int(r), int(r - lo - starts[g])) for r in sel]))
        self.processor, self.max_length, self.overlong = processor, max_length, overlong
        self.vla_as_text, self.action_bins, self.action_range = vla_as_text, action_bins, action_range

    def __iter__(self) -> Iterator[list[Encoded]]:
        from torch.utils.data import get_worker_info

        w = get_worker_info()
        tasks = self.tasks if w is None else self.tasks[w.id :: w.num_workers]
        for path, g, picks in tasks:
            table = pq.ParquetFile(path).read_row_group(g)
            rows = table.take(pa.array([i for _, i in picks])).to_pylist()
            pairs = [(rid, self._render(row)) for (rid, _), row in zip(picks, rows)]
            for s in range(0, len(pairs), ENCODE_ROWS):
                yield encode_rows(pairs[s : s + ENCODE_ROWS], self.processor, self.max_length, self.overlong)

    def _render(self, row: dict) -> dict:
        if row.get("kind") == "vla" and self.vla_as_text:
            lo, hi = self.action_range
            return {**row, **render_vla_as_text(row, bins=self.action_bins, low=lo, high=hi)}
        return row


@dataclass
class _SourceDraw:
    name: str
    order: np.ndarray  # global row ids in visiting order
    weight: float = 0.0
    target: Optional[int] = None  # training samples or tokens; None = every row
    val_target: Optional[int] = None
    visited: int = 0
    train: list[int] = field(default_factory=list)  # rids in visiting order
    val: list[int] = field(default_factory=list)
    train_tokens: int = 0
    skipped: Counter = field(default_factory=Counter)

    def satisfied(self, unit: str) -> bool:
        if self.target is None:
            return self.visited >= len(self.order)
        have = self.train_tokens if unit == "tokens" else len(self.train)
        return have >= self.target and self.val_target is not None and len(self.val) >= self.val_target


def draw_and_prepare(config, index: InputIndex, processor, out_dir: Path, st) -> dict:
    """Run the draw (module docstring, step 2) and write ``out_dir``'s artefacts; returns the composition."""
    import torch.utils.data as tud

    mix = config.mixture
    available = sorted(set(index.sources.tolist()))
    vla = [s for s in available if "vla" in index.kinds.get(s, set())]
    if vla and not config.vla_as_text:
        raise StageError(f"source {vla[0]!r} holds VLA frames, which have no conversation to train on; "
                         "set vla_as_text: true to train on their actions rendered as text")  # fmt: skip
    unknown = sorted(set(mix.weights) - set(available))
    if unknown:
        raise StageError(f"mixture.weights: {unknown[0]!r} is not an input source; the inputs hold {', '.join(available)}")
    draws = {}
    for s in (sorted(mix.weights) if mix.weights else available):
        rows = index.rows_of(s)
        draws[s] = _SourceDraw(s, rows[source_order(config.seed, s, len(rows))],
                               weight=mix.weights.get(s, float(len(rows))) if mix.weights else float(len(rows)))  # fmt: skip
    draws = {s: d for s, d in draws.items() if d.weight > 0}
    if mix.budget:
        for s, share in allocate({s: d.weight for s, d in draws.items()}, mix.budget).items():
            draws[s].target = share
    f = config.val_fraction

    def val_count(base: int) -> int:
        v = int(round(f * base))
        return 1 if f > 0 and v == 0 and base >= 5 else v

    for d in draws.values():
        if d.target is None:
            d.val_target = val_count(len(d.order))

    pool_path = out_dir / POOL_FILE
    pool_rows: dict[int, int] = {}
    info: dict[int, Encoded] = {}
    tmp_pool = out_dir / f".{POOL_FILE}.tmp"
    writer = pa.ipc.new_file(str(tmp_pool), CATALOG_SCHEMA)
    t0 = time.perf_counter()
    try:
        rounds = 0
        while True:
            wanted = {}
            for d in draws.values():
                if d.satisfied(mix.unit):
                    continue
                k = _round_size(d, mix.unit, f)
                wanted[d.name] = d.order[d.visited : d.visited + k]
            wanted = {s: w for s, w in wanted.items() if len(w)}
            if not wanted:
                break
            rounds += 1
            stream = _EncodeStream(index, np.concatenate(list(wanted.values())), processor, config.max_length,
                                   config.overlong, config.vla_as_text, config.action_bins, tuple(config.action_range))  # fmt: skip
            workers = min(config.prepare_workers, len(stream.tasks))
            loader = tud.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                    prefetch_factor=4 if workers else None)  # fmt: skip
            pending: list[dict] = []
            for chunk in loader:
                for enc in chunk:
                    info[enc.rid] = enc
                    if enc.row is not None:
                        pool_rows[enc.rid] = len(pool_rows)
                        pending.append(enc.row)
                if len(pending) >= POOL_BATCH_ROWS:
                    writer.write_table(rows_to_table(pending))
                    pending = []
            if pending:
                writer.write_table(rows_to_table(pending))
            for s, w in wanted.items():
                _assign(draws[s], w, info, mix.unit, val_count, st)
            st.log.info("sft data: round %d visited %d rows; %s", rounds, sum(len(w) for w in wanted.values()),
                        ", ".join(f"{d.name}: {len(d.train)} train / {len(d.val)} val" for d in draws.values()))  # fmt: skip
            short = [d for d in draws.values() if not d.satisfied(mix.unit) and d.visited >= len(d.order)]
            for d in short:
                if d.target is None:
                    continue
                have = d.train_tokens if mix.unit == "tokens" else len(d.train)
                raise StageError(
                    f"mixture: source {d.name!r} has {len(d.order)} rows ({sum(d.skipped.values())} unusable), "
                    f"{have} {mix.unit} for training and {len(d.val)} for validation, short of its share of "
                    f"{d.target} {mix.unit} + {d.val_target if d.val_target is not None else '?'} validation samples; "
                    "lower mixture.budget or its weight"
                )
    finally:
        writer.close()
    tmp_pool.replace(pool_path)

    samples = _samples_table(draws, info, pool_rows)
    if not samples.num_rows or not pc.any(pc.equal(samples.column("split"), "train")).as_py():
        raise StageError("sft: no usable training sample in the inputs (see errors.jsonl)")
    write_parquet_atomic(out_dir / SAMPLES_FILE, samples)
    composition = _composition(config, draws, info, rounds, time.perf_counter() - t0)
    write_json_atomic(out_dir / COMPOSITION_FILE, composition)
    return composition


def _as_is(chunk):
    return chunk


def _round_size(d: _SourceDraw, unit: str, f: float) -> int:
    """How many more rows of a source to visit this round."""
    if d.target is None:
        return len(d.order) - d.visited
    done = d.train_tokens if unit == "tokens" else len(d.train)
    ok_rate = (len(d.train) + len(d.val)) / d.visited if d.visited else 1.0
    if done < d.target:
        if unit == "tokens":
            mean = d.train_tokens / len(d.train) if d.train else None
            need = 256 if mean is None else (d.target - done) / mean
        else:
            need = d.target - done
        need += f * (d.target if unit == "samples" else need)
    else:
        need = (d.val_target or 0) - len(d.val)
    return int(math.ceil(need / max(ok_rate, 0.05) * 1.05)) + 4


def _assign(d: _SourceDraw, visited: np.ndarray, info: dict[int, Encoded], unit: str, val_count, st) -> None:
    """Give the newly visited rows of a source (in visiting order) to validation or training."""
    for rid in visited.tolist():
        d.visited += 1
        enc = info[rid]
        if enc.error is not None:
            d.skipped[enc.error["reason"]] += 1
            st.handle(SampleError(**enc.error))
            continue
        if d.target is None:  # every row: validation first, then training
            (d.val if len(d.val) < d.val_target else d.train).append(rid)
            continue
        have = d.train_tokens if unit == "tokens" else len(d.train)
        if have < d.target:
            d.train.append(rid)
            d.train_tokens += enc.length
            if (d.train_tokens if unit == "tokens" else len(d.train)) >= d.target:
                d.val_target = val_count(len(d.train))
        elif len(d.val) < (d.val_target or 0):
            d.val.append(rid)
        else:
            d.visited -= 1  # not needed: a later round would not revisit it, but keep the count honest
            return
    if d.target is None:
        d.train_tokens = sum(info[r].length for r in d.train)


def _samples_table(draws: dict[str, _SourceDraw], info: dict[int, Encoded], pool_rows: dict[int, int]) -> pa.Table:
    cols: dict[str, list] = {k: [] for k in ("pool_row", "split", "source", "id", "length", "answer_tokens", "truncated")}
    for split in ("train", "val"):
        for s in sorted(draws):
            for rid in getattr(draws[s], split):
                e = info[rid]
                for k, v in (("pool_row", pool_rows[rid]), ("split", split), ("source", s), ("id", e.row["id"]),
                             ("length", e.length), ("answer_tokens", e.answer_tokens), ("truncated", e.truncated)):
                    cols[k].append(v)  # fmt: skip
    types = {"pool_row": pa.int64(), "split": pa.string(), "source": pa.string(), "id": pa.string(),
             "length": pa.int64(), "answer_tokens": pa.int64(), "truncated": pa.bool_()}  # fmt: skip
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def _composition(config, draws: dict[str, _SourceDraw], info: dict[int, Encoded], rounds: int, seconds: float) -> dict:
    mix = config.mixture
    total_w = sum(d.weight for d in draws.values())
    per = {}
    for s, d in sorted(draws.items()):
        per[s] = {
            "weight": d.weight / total_w if mix.weights or mix.budget else None, "asked": d.target,
            "train_samples": len(d.train), "train_tokens": int(d.train_tokens), "val_samples": len(d.val),
            "rows": len(d.order), "visited": d.visited, "skipped": dict(d.skipped),
            "truncated": sum(info[r].truncated for r in d.train + d.val),
        }  # fmt: skip
    train_n = sum(v["train_samples"] for v in per.values())
    for v in per.values():
        v["train_fraction"] = v["train_samples"] / train_n if train_n else 0.0
    return {"unit": mix.unit, "budget": mix.budget or None, "seed": config.seed, "val_fraction": config.val_fraction,
            "sources": per, "train_samples": train_n, "train_tokens": sum(v["train_tokens"] for v in per.values()),
            "val_samples": sum(v["val_samples"] for v in per.values()), "truncated": sum(v["truncated"] for v in per.values()),
            "rounds": rounds, "seconds": round(seconds, 2)}  # fmt: skip


def read_composition(data_dir: Path) -> Optional[dict]:
    path = data_dir / COMPOSITION_FILE
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- datasets and batches


class PoolRows:
    """Map-style dataset: catalog rows of ``pool.arrow`` (memory-mapped) at the given pool rows."""

    def __init__(self, pool_path: Path, pool_rows: np.ndarray):
        self.pool_path, self.pool_rows = str(pool_path), np.asarray(pool_rows, dtype=np.int64)
        self._reader = None
        self._starts: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.pool_rows)

    def __getitem__(self, i: int) -> dict:
        if self._reader is None:  # opened lazily in each process (DataLoader workers included)
            self._reader = pa.ipc.open_file(pa.memory_map(self.pool_path, "r"))
            sizes = [self._reader.get_batch(k).num_rows for k in range(self._reader.num_record_batches)]
            self._starts = np.cumsum([0] + sizes)
        row = int(self.pool_rows[i])
        k = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._reader.get_batch(k).slice(row - int(self._starts[k]), 1).to_pylist()[0]

    def __getstate__(self):
        return {**self.__dict__, "_reader": None, "_starts": None}


@dataclass
class SFTData:
    train: PoolRows
    val: PoolRows
    train_lengths: np.ndarray
    val_lengths: np.ndarray
    composition: dict


def load_prepared(data_dir: Path) -> SFTData:
    samples = pq.read_table(data_dir / SAMPLES_FILE)
    split = samples.column("split").to_numpy(zero_copy_only=False)
    pool_row = samples.column("pool_row").to_numpy()
    length = samples.column("length").to_numpy()
    tr, va = split == "train", split == "val"
    pool = data_dir / POOL_FILE
    return SFTData(PoolRows(pool, pool_row[tr]), PoolRows(pool, pool_row[va]), length[tr], length[va],
                   read_composition(data_dir) or {})  # fmt: skip


def collate_sft(rows: list[dict], processor, max_length: int, overlong: str) -> dict[str, Any]:
    """One micro-batch: processor inputs, ``labels`` (answer tokens, -100 elsewhere), ``sample_ids``,
    ``loss_weight`` (answer tokens predicted) and ``num_tokens`` (non-padding tokens)."""
    batch, info = build_batch(rows, processor, max_length=max_length, overlong=overlong, answer_mask=True)
    if info.errors or batch is None or info.size != len(rows):
        e = info.errors[0] if info.errors else None
        where = f"{e.where}: {e.reason} ({e.detail})" if e else "a sample"
        raise StageError(f"sft: {where} could not be batched although it was measured before training "
                         "(did an input file change?); rerun with --force")  # fmt: skip
    out = dict(batch)
    out["labels"] = out["input_ids"].masked_fill(~info.answer_mask, IGNORE)
    out["sample_ids"] = [rows[p]["id"] for p in info.positions]
    out["loss_weight"] = int((out["labels"][:, 1:] != IGNORE).sum())
    out["num_tokens"] = int(out["attention_mask"].sum())
    return out
