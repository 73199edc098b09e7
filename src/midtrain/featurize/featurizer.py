"""The featurizer, split where the work splits: preparing batches (CPU: decode, template, processor)
and running the backbone (GPU or CPU: forward, pool), so preparation runs in DataLoader workers or
Ray actors while the model runs.

- :class:`BatchPreparer` turns one shard's catalog rows into a :class:`ShardStart` then that
  shard's :class:`PreparedBatch` es (length-bucketed, processor outputs as tensors);
- :class:`FeatureExtractor` runs only the backbone (no LM head, no all-layer hidden states) and
  pools ``last_hidden_state`` into float32 features;
- :class:`ShardSink` gathers a shard's batches (in any order, interleaved with other shards),
  applies ``on_error`` to the rows left out, checks every feature is finite, and writes the
  shard in catalog order as float16 with its ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from ..data.features import shard_name, write_feature_shard
from ..models.forward import accepted_arguments
from ..models.inputs import build_batch
from ..models.loading import backbone, multimodal_token_ids
from ..runs import SampleError, StageError, StageRun
from .pooling import pool
from .shards import ImageTokenCounter, estimate_tokens, image_groups, plan_batches

FLOAT16_MAX = 65504.0


@dataclass
class ShardStart:
    """First item of every shard: how many batches will follow and the ids of all its rows."""

    shard: int
    n_batches: int
    ids: pa.Table  # id, source, kind of every row of the shard, catalog order


@dataclass
class PreparedBatch:
    """One batch of processor outputs and what happened to each of its rows.

    ``positions``: rows within the shard (batch order); ``inputs``: tensors for the backbone (None
    when every row was left out); ``errors``: rows left out, as dicts (reason, where, detail,
    sample_id), since exceptions do not cross process boundaries reliably.
    """

    shard: int
    index: int
    positions: np.ndarray
    sample_ids: list[str]
    origins: list[str]
    inputs: dict[str, Any] | None
    lengths: np.ndarray
    truncated: np.ndarray
    errors: list[dict] = field(default_factory=list)

    def pin_memory(self) -> "PreparedBatch":
        """Called by the DataLoader's pinning thread on CUDA: page-locked inputs copy asynchronously."""
        if self.inputs is None:
            return self
        return replace(self, inputs={k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in self.inputs.items()})


class BatchPreparer:
    """Builds a shard's batches with the model's processor. Holds no model, so it is cheap to copy
    into DataLoader workers / Ray actors."""

    def __init__(self, processor, *, include_assistant: bool = True, max_length: int | None = None,
                 overlong: str = "truncate", batch_size: int = 16, max_tokens_per_batch: int = 16384):  # fmt: skip
        self.processor = processor
        self.include_assistant = include_assistant
        self.max_length = max_length
        self.overlong = overlong
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.image_tokens = ImageTokenCounter(processor)

    def plan(self, table: pa.Table) -> list[np.ndarray]:
        est = estimate_tokens(table, self.image_tokens, self.include_assistant)
        if self.max_length is not None:
            est = np.minimum(est, self.max_length)
        return plan_batches(est, self.batch_size, self.max_tokens_per_batch, image_groups(table))

    def prepare_shard(self, shard: int, table: pa.Table) -> Iterator[ShardStart | PreparedBatch]:
        batches = self.plan(table)
        yield ShardStart(shard, len(batches), table.select(["id", "source", "kind"]))
        for index, rows_idx in enumerate(batches):
            yield self.prepare_batch(shard, index, table, rows_idx)

    def prepare_batch(self, shard: int, index: int, table: pa.Table, rows_idx: np.ndarray) -> PreparedBatch:
        rows = table.take(pa.array(rows_idx)).to_pylist()
        inputs, info = build_batch(
            rows, self.processor, include_assistant=self.include_assistant,
            max_length=self.max_length, overlong=self.overlong,
        )  # fmt: skip
        errors = [{"reason": e.reason, "where": e.where, "detail": e.detail, "sample_id": e.sample_id} for e in info.errors]
        return PreparedBatch(
            shard=shard, index=index, positions=rows_idx[info.positions],
            sample_ids=[rows[p]["id"] for p in info.positions],
            origins=[rows[p].get("origin") or rows[p]["id"] for p in info.positions],
            inputs=dict(inputs) if inputs is not None else None,
            lengths=info.lengths, truncated=info.truncated, errors=errors,
        )  # fmt: skip


def make_preparer(config, processor) -> BatchPreparer:
    """The :class:`BatchPreparer` a :class:`~.config.FeaturizeConfig` asks for (the local and Ray backends share it)."""
    return BatchPreparer(
        processor, include_assistant=config.include_assistant, max_length=config.max_length,
        overlong=config.overlong, batch_size=config.batch_size, max_tokens_per_batch=config.max_tokens_per_batch,
    )  # fmt: skip


def vision_tower(model):
    """The vision encoder of a loaded VLM (``visual``, ``vision_tower`` or ``vision_model`` of its
    backbone), or None."""
    base = backbone(model)
    return next((getattr(base, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(base, n)), None)


def compile_backbone(model) -> list[str]:
    """``torch.compile`` (inductor, dynamic shapes), in place, the parts of ``model`` where
    elementwise work (norms, rotary embeddings, activations) sits between the matmuls: every
    decoder layer of the language model and every ``mlp`` of the vision tower. Returns their names.

    Not the whole backbone: its multimodal glue (rope indices, image-token placement, Qwen-VL's
    per-image attention loop) breaks the graph and recompiled for every new image-token count
    until torch's recompile limit, which on 2 CPU cores cost 4 minutes of compiling for no more
    speed. The layers compile once per process (twice for the decoder: batches with and without
    padding), 20-40 s on 2 CPU cores for the benchmark's Qwen2-VL ``bench`` model.
    """
    base = backbone(model)
    compiled = []
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for i, layer in enumerate(getattr(decoder, "layers", None) or []):
        layer.compile(dynamic=True)
        compiled.append(f"decoder.layers.{i}")
    vision = vision_tower(model)
    for name, module in vision.named_modules() if vision is not None else []:
        if name.rsplit(".", 1)[-1] == "mlp":
            module.compile(dynamic=True)
            compiled.append(f"vision.{name}")
    return compiled


def _graphs_compiled() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return 0


class FeatureExtractor:
    """Runs the backbone of a loaded VLM on prepared inputs and pools ``last_hidden_state``.

    Only ``model.model`` runs (``use_cache=False``, no ``output_hidden_states``): no vocabulary
    logits and no per-layer hidden states are materialised. ``compile=True`` compiles parts of
    the model in place (:func:`compile_backbone`); ``compile_s`` then sums the wall time of the
    batches during which torch compiled something (the compile and that batch's forward).
    """

    def __init__(self, model, pooling: str = "mean", device: str | None = None, compile: bool = False):
        import torch

        self.model = model
        self.backbone = backbone(model)
        self.compiled = compile_backbone(model) if compile else []
        self.compile_s = 0.0
        self.pooling = pooling
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        ids = multimodal_token_ids(model.config)
        self.image_token_ids = ids["image"] + ids["video"]
        self.dim = int(model.config.get_text_config().hidden_size)
        self.accepted = accepted_arguments(self.backbone.forward)

    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs the backbone accepts, on its device; floating tensors in the model dtype."""
        out = {}
        for key, value in inputs.items():
            if key not in self.accepted or not hasattr(value, "to"):
                continue
            if value.is_floating_point():
                value = value.to(self.device, dtype=self.dtype, non_blocking=True)
            else:
                value = value.to(self.device, non_blocking=True)
            out[key] = value
        return out

    def __call__(self, inputs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(features [B, D] float32, pooled token counts [B])`` for one prepared batch."""
        import torch

        graphs, t0 = (_graphs_compiled(), time.perf_counter()) if self.compiled else (0, 0.0)
        with torch.inference_mode():
            kw = self.model_inputs(inputs)
            hidden = self.backbone(**kw, use_cache=False).last_hidden_state
            feats, counts = pool(hidden, kw["attention_mask"], kw["input_ids"], self.pooling, self.image_token_ids)
            out = feats.cpu().numpy(), counts.cpu().numpy()
        if self.compiled and _graphs_compiled() > graphs:
            self.compile_s += time.perf_counter() - t0
        return out


@dataclass
class _OpenShard:
    start: ShardStart
    received: int = 0
    positions: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0
    tokens: int = 0


class ShardSink:
    """Collects features per shard and writes each shard when its last batch arrives.

    Rows left out (``PreparedBatch.errors``, or nothing to pool) go through ``st.handle`` (raise, or
    recorded skip attributed to the shard). A non-finite feature, or one that overflows float16,
    always raises, naming the sample: it means the model or its dtype is broken, not the sample.
    """

    def __init__(self, st: StageRun, dim: int, pooling: str, keys: dict[int, str] | None = None):
        self.st = st
        self.dim = dim
        self.pooling = pooling
        self.keys = keys or {}  # shard -> content key, recorded in its .done marker (see shard_keys)
        self.shards_dir = st.dir / "shards"
        self.open: dict[int, _OpenShard] = {}
        self.written: list[str] = []

    def start(self, item: ShardStart) -> None:
        self.open[item.shard] = _OpenShard(item)
        if item.n_batches == 0:
            self._finish(item.shard)

    def add(self, item: PreparedBatch, features: np.ndarray | None, counts: np.ndarray | None) -> None:
        shard = self.open[item.shard]
        self.st.current_shard = shard_name(item.shard)
        for err in item.errors:
            self.st.handle(SampleError(**err))
        if features is not None:
            keep = counts > 0
            for i in np.flatnonzero(~keep):
                self.st.handle(SampleError(
                    "nothing to pool", item.origins[i],
                    f"pooling {self.pooling!r} found no tokens to average (e.g. image_mean on a sample without images)",
                    item.sample_ids[i],
                ))  # fmt: skip
            self._check_finite(item, features, keep)
            shard.positions.append(item.positions[keep])
            shard.features.append(features[keep].astype(np.float16))
            shard.truncated += int(item.truncated.sum())
            shard.tokens += int(item.lengths.sum())
        shard.received += 1
        if shard.received == shard.start.n_batches:
            self._finish(item.shard)

    def _check_finite(self, item: PreparedBatch, features: np.ndarray, keep: np.ndarray) -> None:
        bad = keep & ~np.isfinite(features).all(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise StageError(
                f"featurize: non-finite feature (NaN/inf) for sample {item.sample_ids[i]!r} "
                f"(shard {shard_name(item.shard)}); the model produced NaN/inf, check the checkpoint and dtype"
            )
        big = keep & (np.abs(features).max(axis=1, initial=0.0) > FLOAT16_MAX)
        if big.any():
            i = int(np.flatnonzero(big)[0])
            raise StageError(
                f"featurize: feature of sample {item.sample_ids[i]!r} exceeds the float16 range "
                f"(|x| = {float(np.abs(features[i]).max()):.3g} > 65504); use a pooling over normalised states"
            )

    def _finish(self, shard_no: int) -> None:
        shard = self.open.pop(shard_no)
        name = shard_name(shard_no)
        if shard.positions:
            positions = np.concatenate(shard.positions)
            feats = np.concatenate(shard.features)
        else:
            positions = np.zeros(0, dtype=np.int64)
            feats = np.zeros((0, self.dim), dtype=np.float16)
        order = np.argsort(positions, kind="stable")
        ids = shard.start.ids.take(pa.array(positions[order]))
        info = {
            "read": shard.start.ids.num_rows,
            "written": int(len(positions)),
            "truncated": shard.truncated,
            "tokens": shard.tokens,
        }
        for key, value in info.items():
            self.st.counts[key] += value
        if shard_no in self.keys:
            info["key"] = self.keys[shard_no]
        write_feature_shard(self.shards_dir, name, feats[order], ids, info)
        self.written.append(name)

    @property
    def pending(self) -> list[int]:
        return sorted(self.open)


def restore_counts(st: StageRun, shards_dir: Path) -> int:
    """Add the counts of shards finished by an earlier, interrupted attempt; returns how many."""
    import json

    n = 0
    for done in sorted(shards_dir.glob("shard-*.done")):
        info = json.loads(done.read_text())
        for key in ("read", "written", "truncated", "tokens"):
            st.counts[key] += int(info.get(key, 0))
        n += 1
    return n


class Throughput:
    """Samples and tokens per second over the model phase, for the log and the manifest."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.samples = 0
        self.tokens = 0

    def add(self, item: PreparedBatch) -> None:
        self.samples += len(item.positions)
        self.tokens += int(item.lengths.sum())

    def summary(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"samples_per_s": round(self.samples / dt, 2), "tokens_per_s": round(self.tokens / dt, 1)}
