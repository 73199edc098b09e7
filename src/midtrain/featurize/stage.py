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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import ConfigError, StageConfig
from ..data.features import shard_name
from ..models.loading import ATTN_IMPLEMENTATIONS, check_vlm, load_processor, load_vlm, processor_settings, resolve_device, resolve_dtype
from ..runs import RunDir, StageError, stage_run
from .featurizer import BatchPreparer, FeatureExtractor, PreparedBatch, ShardSink, ShardStart, Throughput, restore_counts
from .shards import CatalogIndex


@dataclass
class RayOptions:
    """Ray Data backend settings (``backend: ray``).

    ``address``: None starts a local Ray instance; ``"auto"`` (or ``ray://host:10001``) joins a
    running cluster. ``num_actors`` model replicas (one model per actor) with ``gpus_per_actor``
    GPUs and ``cpus_per_actor`` CPUs each; ``num_preprocess_actors`` CPU actors run the processor
    (image decoding, chat template) and stream batches to them.
    """

    address: Optional[str] = None
    num_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    num_preprocess_actors: int = 1
    cpus_per_preprocess_actor: float = 1.0


@dataclass
class FeaturizeConfig(StageConfig):
    """Featurize settings. ``model`` is a hub id or a local checkpoint directory (required).

    Model: ``dtype`` (``auto``: bfloat16/float16 on GPU, float32 on CPU), ``device`` (``auto``,
    ``cpu``, ``cuda``, ``cuda:1``), ``attn_implementation`` (``sdpa``), ``trust_remote_code``,
    ``processor_kwargs`` (e.g. ``{max_pixels: 200704}`` for Qwen-VL).
    Inputs: ``include_assistant`` (answers in VLM conversations), ``max_length`` tokens, and what to
    do with longer samples: ``overlong: truncate`` (cut the text tail; samples whose images would
    be cut are skipped) or ``skip``. ``pooling``: ``mean`` | ``last`` | ``image_mean`` | ``text_mean``.
    Throughput: ``batch_size`` rows and ``max_tokens_per_batch`` padded tokens per batch,
    ``shard_size`` rows per output shard, ``num_workers`` DataLoader workers (None: 1 on CPU,
    up to 8 on GPU; 0 prepares in the main process), ``prefetch_factor`` batches per worker,
    ``compile`` (off by default): ``torch.compile`` the language model's decoder layers and the
    vision tower's MLPs (:func:`~.featurizer.compile_backbone`). On the 2-core CPU benchmark the
    compiled model ran about 1.2x the eager one (4.2-4.4x the naive loop in 5 runs, eager 3.1-4.1x
    in 14), after a compile of 34-40 s once per process plus a recompile of about 10 s at the first
    batch without padding (both in ``compile_s`` in the manifest): for long runs only.
    """

    model: str = ""
    catalog: Optional[Path] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    pooling: Literal["mean", "last", "image_mean", "text_mean"] = "mean"
    include_assistant: bool = True
    max_length: int = 4096
    overlong: Literal["truncate", "skip"] = "truncate"
    batch_size: int = 32
    max_tokens_per_batch: int = 32768
    shard_size: int = 2048
    num_workers: Optional[int] = None
    prefetch_factor: int = 4
    compile: bool = False
    backend: Literal["local", "ray"] = "local"
    ray: RayOptions = field(default_factory=RayOptions)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a Hugging Face hub id or a local checkpoint directory)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}")
        for key in ("max_length", "batch_size", "max_tokens_per_batch", "shard_size", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.ray.num_actors < 1 or self.ray.num_preprocess_actors < 1:
            raise ConfigError("ray.num_actors and ray.num_preprocess_actors: must be >= 1")
        if self.ray.gpus_per_actor < 0 or self.ray.cpus_per_actor < 0 or self.ray.cpus_per_preprocess_actor < 0:
            raise ConfigError("ray.gpus_per_actor / ray.cpus_per_actor / ray.cpus_per_preprocess_actor: must be >= 0")


def default_num_workers(device: str) -> int:
    """GPU: up to 8 workers, leaving a core for the main process. CPU: 1 - the model needs the
    cores, and preparation is a few percent of the work there (on 2 cores, 0 and 1 workers measured
    within noise of each other with the benchmark's model)."""
    if device.startswith("cuda"):
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 1


def make_preparer(config: FeaturizeConfig, processor) -> BatchPreparer:
    return BatchPreparer(
        processor, include_assistant=config.include_assistant, max_length=config.max_length,
        overlong=config.overlong, batch_size=config.batch_size, max_tokens_per_batch=config.max_tokens_per_batch,
    )  # fmt: skip


def _inputs(config: FeaturizeConfig, catalog: Path) -> dict[str, Path]:
    inputs = {"catalog": catalog}
    local_model = Path(config.model).expanduser()
    if local_model.is_dir():
        inputs["model"] = local_model  # a changed local checkpoint invalidates the features
    return inputs


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
        n_done = restore_counts(st, shards_dir)
        pending = [(k, a, b) for k, (a, b) in enumerate(ranges) if not st.shard_done(shard_name(k))]
        st.log.info(
            "catalog %s: %d rows in %d shard(s) of %d; %d already done, %d to featurize with %s",
            catalog, index.num_rows, len(ranges), config.shard_size, n_done, len(pending), config.model,
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
        sink = ShardSink(st, dim, config.pooling)
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
