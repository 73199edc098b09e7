"""Alignment data: conversations encoded once, and the frozen tower's features cached once per image.

The vision tower is frozen in both LLaVA stages, so its output for an image never changes: the
stage runs it once per distinct image and trains on the cached features (the projector's input:
for LLaVA, the selected layer with the CLS token dropped or kept as the config says). Training
then costs the projector and the language model only.

Layout in the stage folder::

    features/part-NNNNN.npy   float16 [images, tokens, width]: projector inputs, one part per encode batch
    features/index.json       image key -> [part, row] (key: the image file, or a hash of its bytes)
    data/<phase>.parquet      id, input_ids, labels (-100 off the answers), feature_rows ([part, row] per image)

Rows are encoded with the VLM's own processor and chat template (:func:`midtrain.models.inputs.build_batch`
with answer masks, as ``midtrain sft`` does); a missing or undecodable image, or a sample longer than
``max_length``, follows ``on_error``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..models.inputs import build_batch
from ..runs import SampleError, StageError, save_npy_atomic, write_json_atomic, write_parquet_atomic

IGNORE = -100
FEATURES_DIR = "features"
DATA_DIR = "data"


def image_key(ref: dict) -> str:
    """Identity of an image reference: its file, or the hash of its bytes."""
    if ref.get("path"):
        return f"path:{ref['path']}"
    return "sha1:" + hashlib.sha1(ref.get("bytes") or b"").hexdigest()


def read_rows(sources, seed: int, st) -> list[dict]:
    """Catalog rows of the given dataset sources (bad records: ``on_error``)."""
    from ..catalog.stage import open_reader

    rows = []
    for src in sources:
        n = 0
        for _, item in open_reader(src, src.seed if src.seed is not None else seed).iter_samples():
            if isinstance(item, SampleError):
                st.handle(item)
                continue
            rows.append({**item, "id": f"{src.name}/{item['id']}", "source": src.name, "kind": src.kind})
            n += 1
        if not n:
            raise StageError(f"{src.path}: no usable sample (source {src.name!r})")
    return rows


class FeatureCache:
    """Projector inputs per image, computed with the frozen tower once and kept in ``features/``."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        index = root / "index.json"
        self.index: dict[str, list[int]] = json.loads(index.read_text()) if index.exists() else {}
        self.parts = len(list(root.glob("part-*.npy")))
        self._arrays: dict[int, np.ndarray] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def add(self, keys: list[str], features: np.ndarray) -> None:
        """Store one part (``features[i]`` is image ``keys[i]``), then the index that names it."""
        save_npy_atomic(self.root / f"part-{self.parts:05d}.npy", features.astype(np.float16))
        for row, key in enumerate(keys):
            self.index[key] = [self.parts, row]
        self.parts += 1
        write_json_atomic(self.root / "index.json", self.index)

    def rows(self, parts_rows: np.ndarray) -> np.ndarray:
        """float32 ``[n, tokens, width]`` of the ``[part, row]`` pairs."""
        out = []
        for part, row in parts_rows:
            if part not in self._arrays:
                self._arrays[part] = np.load(self.root / f"part-{part:05d}.npy", mmap_mode="r")
            out.append(self._arrays[part][row])
        return np.stack(out).astype(np.float32)


def projector_inputs(vlm, pixel_values) -> Any:
    """What the projector receives for these images (the tower's selected features), via a hook."""
    import torch

    captured = []
    hook = vlm.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            kwargs = {k: getattr(vlm.config, k) for k in ("vision_feature_layer", "vision_feature_select_strategy")
                      if getattr(vlm.config, k, None) is not None}  # fmt: skip
            vlm.model.get_image_features(pixel_values=pixel_values, **kwargs)
    finally:
        hook.remove()
    return captured[0]


def encode_phase(rows: list[dict], processor, vlm, cache: FeatureCache, max_length: int, batch: int, st,
                 progress_desc: str) -> pa.Table:  # fmt: skip
    """Encode ``rows`` (answer-token labels), caching tower features of images not yet cached."""
    import torch

    image_token = vlm.config.image_token_id
    out: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "feature_rows": []}
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    for chunk in st.progress(chunks, total=len(chunks), desc=progress_desc, unit="batch"):
        encoded, info = build_batch(chunk, processor, max_length=max_length, overlong="skip", answer_mask=True)
        for err in info.errors:
            st.handle(err)
        if encoded is None:
            continue
        kept = [chunk[p] for p in info.positions]
        images = [image_key(ref) for row in kept for ref in (row.get("image_refs") or [])]
        if "pixel_values" in encoded and len(images) != encoded["pixel_values"].shape[0]:
            raise StageError(f"{progress_desc}: the processor made {encoded['pixel_values'].shape[0]} images of "
                             f"{len(images)} image references in a batch; align takes one image per <image>")  # fmt: skip
        new = [(i, k) for i, k in enumerate(images) if k not in cache]
        new = [(i, k) for j, (i, k) in enumerate(new) if k not in {kk for _, kk in new[:j]}]
        if new:
            pixels = encoded["pixel_values"][[i for i, _ in new]].to(vlm.dtype)
            cache.add([k for _, k in new], projector_inputs(vlm, pixels).float().numpy())
        ids, attn, mask = encoded["input_ids"], encoded["attention_mask"].bool(), info.answer_mask
        at = 0
        for b, row in enumerate(kept):
            n_images = len(row.get("image_refs") or [])
            length = int(attn[b].sum())
            sample_ids = ids[b, :length]
            labels = torch.where(mask[b, :length], sample_ids, torch.full_like(sample_ids, IGNORE))
            if not bool((labels[1:] != IGNORE).any()):
                st.handle(SampleError("no answer tokens", row.get("origin") or row["id"], "the answer was empty", row["id"]))
                at += n_images
                continue
            if int((sample_ids == image_token).sum()) and not n_images:
                raise StageError(f"{row['id']}: image tokens without an image")
            out["id"].append(row["id"])
            out["input_ids"].append(sample_ids.numpy().astype(np.int32))
            out["labels"].append(labels.numpy().astype(np.int32))
            out["feature_rows"].append([cache.index[k] for k in images[at : at + n_images]])
            at += n_images
    return pa.table({
        "id": pa.array(out["id"], pa.string()),
        "input_ids": pa.array([a.tolist() for a in out["input_ids"]], pa.list_(pa.int32())),
        "labels": pa.array([a.tolist() for a in out["labels"]], pa.list_(pa.int32())),
        "feature_rows": pa.array(out["feature_rows"], pa.list_(pa.list_(pa.int32()))),
    })  # fmt: skip


def write_phase(table: pa.Table, path: Path) -> None:
    write_parquet_atomic(path, table)


class EncodedSamples:
    """A map-style dataset over one phase's encoded samples (kept in memory: ids and labels are small)."""

    def __init__(self, path: Path):
        t = pq.read_table(path)
        self.ids = t.column("id").to_pylist()
        self.input_ids = [np.asarray(a, np.int64) for a in t.column("input_ids").to_pylist()]
        self.labels = [np.asarray(a, np.int64) for a in t.column("labels").to_pylist()]
        self.feature_rows = t.column("feature_rows").to_pylist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"id": self.ids[i], "input_ids": self.input_ids[i], "labels": self.labels[i],
                "feature_rows": self.feature_rows[i]}  # fmt: skip

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a) for a in self.input_ids])


def collate_aligned(rows: list[dict], cache: FeatureCache, pad_id: int) -> dict:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` and the images' cached ``image_features``."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.from_numpy(r["input_ids"])
        labels[i, :n] = torch.from_numpy(r["labels"])
        attn[i, :n] = 1
    feature_rows = np.array([fr for r in rows for fr in r["feature_rows"]], dtype=np.int64).reshape(-1, 2)
    return {
        "input_ids": ids, "attention_mask": attn, "labels": labels,
        "image_features": torch.from_numpy(cache.rows(feature_rows)) if len(feature_rows) else None,
        "sample_ids": [r["id"] for r in rows], "loss_weight": int((labels[:, 1:] != IGNORE).sum()),
        "num_tokens": int(attn.sum()),
    }  # fmt: skip
