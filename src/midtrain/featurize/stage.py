"""``midtrain featurize``: pooled last-hidden-state features of every catalog sample from a frozen VLM.

Reads the catalog (``<run>/catalog`` or ``catalog: PATH``), writes ``<run>/featurize/shards/``
(``shard-NNNNN.npy`` float16 ``[n, dim]``, ``shard-NNNNN.ids.parquet``, ``shard-NNNNN.done``; see
:mod:`midtrain.data.features`) and a manifest with ``dim``, ``model``, ``pooling``, ``dtype``,
``max_length``, ``include_assistant``, the processor's settings and the counts (read, written,
truncated, tokens, skipped by reason).

Shard ``k`` holds catalog rows ``[k * shard_size, (k + 1) * shard_size)`` minus skipped rows, in
catalog order. A killed run, started again with the same command, computes only the shards
without a ``.done`` marker, and its result equals an uninterrupted run.

Backends: ``local`` (DataLoader workers prepare batches while this process runs the model) and
``ray`` (the same preparer and model code in Ray Data actor pools; see
:mod:`midtrain.featurize.ray_backend` and ``docs/featurize-ray.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from ..config import output_settings
from ..data.features import shard_name
from ..models.loading import check_vlm, load_processor, load_vlm, processor_settings, resolve_device, resolve_dtype
from ..runs import RunDir, StageError, stage_run
from .config import FeaturizeConfig
from .featurizer import FeatureExtractor, PreparedBatch, ShardSink, ShardStart, Throughput, make_preparer, restore_counts
from .shards import CatalogIndex


def default_num_workers(device: str) -> int:
    """GPU: up to 8 workers, leaving a core for the main process. CPU: 1 - the model needs the
    cores, and preparation is a few percent of the work there (on 2 cores, 0 and 1 workers measured
    within noise of each other with the benchmark's model)."""
    if device.startswith("cuda"):
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 1


def _inputs(config: FeaturizeConfig, catalog: Path) -> dict[str, Path]:
    inputs = {"catalog": catalog}
    local_model = Path(config.model).expanduser()
    if local_model.is_dir():
        inputs["model"] = local_model  # a changed local checkpoint invalidates the features
    return inputs


def shard_keys(config: FeaturizeConfig, st, index: CatalogIndex, ranges: list[tuple[int, int]]) -> dict[int, str]:
    """Per shard, a hash of everything its features depend on: the output settings, the model (its
    content hash when local), and its rows' ids and ``content_hash`` (which covers the images they
    reference). A changed image changes exactly the keys of the shards holding its rows, so a rerun
    recomputes those and hard-links the rest from the previous output (``StageRun.reuse_shard``).
    A catalog without ``content_hash`` (written before it existed) gives no keys: no reuse."""
    settings = {k: v for k, v in output_settings(config).items() if k != "catalog"}
    base = json.dumps({"settings": settings, "model": st.inputs.get("model", config.model)}, sort_keys=True, default=str)
    if not index.row_groups or "content_hash" not in pq.ParquetFile(index.row_groups[0].path).schema_arrow.names:
        return {}
    keys = {}
    for k, (a, b) in enumerate(ranges):
        rows = index.read_rows(a, b, columns=["id", "content_hash"])
        h = hashlib.blake2b(base.encode(), digest_size=16)
        for sample_id, content in zip(rows.column("id").to_pylist(), rows.column("content_hash").to_pylist()):
            if content is None:
                return {}
            h.update(f"{sample_id}\0{content}\0".encode())
        keys[k] = h.hexdigest()
    return keys


def featurize(config: FeaturizeConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run the featurize stage into ``run_dir/featurize``; returns that directory."""
    model_config = check_vlm(config.model, config.trust_remote_code)  # fail fast, before reading the catalog
    catalog = Path(config.catalog) if config.catalog else run_dir.require("catalog")
    if not catalog.is_dir():
        raise StageError(f"catalog: {catalog} is not a directory; point `catalog:` at a catalog stage output")
    with stage_run(run_dir, "featurize", config, inputs=_inputs(config, catalog), force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        index = CatalogIndex.open(catalog)
        ranges = index.shard_ranges(config.shard_size)
        shards_dir = st.dir / "shards"
        shards_dir.mkdir(parents=True, exist_ok=True)
        keys = shard_keys(config, st, index, ranges)
        reused = [k for k in keys if not st.shard_done(shard_name(k)) and st.reuse_shard(
            shard_name(k), keys[k], [f"shards/{shard_name(k)}.npy", f"shards/{shard_name(k)}.ids.parquet"])]
        n_done = restore_counts(st, shards_dir)
        pending = [(k, a, b) for k, (a, b) in enumerate(ranges) if not st.shard_done(shard_name(k))]
        st.extra["reused_shards"] = len(reused)
        st.log.info(
            "catalog %s: %d rows in %d shard(s) of %d; %d already done (%d reused from the previous output, same "
            "content), %d to featurize with %s",
            catalog, index.num_rows, len(ranges), config.shard_size, n_done, len(reused), len(pending), config.model,
        )  # fmt: skip
        device = resolve_device(config.device) if config.backend == "local" else config.device
        with st.timed("load_model"):
            if config.backend == "local":
                model, processor = load_vlm(
                    config.model, config.dtype, device, config.attn_implementation, config.trust_remote_code,
                    config.processor_kwargs,
                )  # fmt: skip
                dim, model_type = int(model.config.get_text_config().hidden_size), model.config.model_type
                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            else:
                model = None
                processor = load_processor(config.model, config.trust_remote_code, **config.processor_kwargs)
                dim, model_type = int(model_config.get_text_config().hidden_size), model_config.model_type
                gpu = config.ray.gpus_per_actor > 0
                dtype = str(resolve_dtype(config.dtype, "cuda" if gpu else "cpu")) if config.dtype == "auto" else config.dtype
                dtype = dtype.removeprefix("torch.")
        st.extra.update({
            "dim": dim, "model": config.model, "model_type": model_type, "pooling": config.pooling,
            "dtype": dtype, "feature_dtype": "float16", "device": device, "attn_implementation": config.attn_implementation,
            "max_length": config.max_length, "include_assistant": config.include_assistant, "overlong": config.overlong,
            "processor": processor_settings(processor), "shard_size": config.shard_size, "num_shards": len(ranges),
            "backend": config.backend, "compile": config.compile,
        })  # fmt: skip
        sink = ShardSink(st, dim, config.pooling, keys)
        if pending:
            with st.timed("featurize"):
                if config.backend == "ray":
                    from .ray_backend import run_ray

                    throughput = run_ray(config, st, index, pending, sink)
                else:
                    throughput = _run_local(config, st, index, pending, model, processor, device, sink)
            st.extra["throughput"] = throughput
        if sink.pending:
            raise StageError(f"featurize: shards {sink.pending} did not receive all their batches (internal error)")
    return st.dir


def _run_local(config, st, index, pending, model, processor, device, sink: ShardSink) -> dict:
    from .local import ShardStream, iter_features

    extractor = FeatureExtractor(model, config.pooling, compile=config.compile)
    stream = ShardStream(index, pending, make_preparer(config, processor))
    workers = config.num_workers if config.num_workers is not None else default_num_workers(device)
    throughput = Throughput()
    with st.progress(total=sum(b - a for _, a, b in pending), desc="featurize", unit="sample") as bar:
        for item, feats, counts in iter_features(stream, extractor, workers, config.prefetch_factor):
            if isinstance(item, ShardStart):
                sink.start(item)
                continue
            assert isinstance(item, PreparedBatch)
            sink.add(item, feats, counts)
            throughput.add(item)
            bar.update(len(item.positions) + len(item.errors))
    summary = throughput.summary()
    if config.compile:
        st.extra["compile_s"] = round(extractor.compile_s, 1)
        st.log.info("compiled %d modules; batches that compiled took %.1f s", len(extractor.compiled), extractor.compile_s)
    st.log.info("featurized %d samples: %.1f samples/s, %.0f tokens/s", throughput.samples,
                summary["samples_per_s"], summary["tokens_per_s"])  # fmt: skip
    return summary
