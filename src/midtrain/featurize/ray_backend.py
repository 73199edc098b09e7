"""Ray Data backend (``backend: ray``): the same featurizer, scaled out over a Ray cluster.

The pipeline is two actor pools in one streaming Ray Data job::

    from_items(pending shards)
      -> map_batches(ShardPreparer, num_preprocess_actors CPU actors)   # read rows, decode, template, processor
      -> map_batches(FeaturizeActor, num_actors actors, gpus_per_actor)  # one model per actor: backbone + pooling
      -> driver: ShardSink writes shard-NNNNN.{npy,ids.parquet,done}

Both stages run the exact code of the local backend (:class:`~.featurizer.BatchPreparer`,
:class:`~.featurizer.FeatureExtractor`), so shards are the same (up to float rounding of
different thread counts) and the run resumes shard by shard like a local run. Preparation
streams batch by batch (a generator UDF), so memory stays bounded by Ray Data's backpressure,
not by shard size. The driver applies ``on_error`` and writes every shard, so errors and counts
land in this run's manifest exactly as in a local run.

Multi-node: start a cluster (``ray start --head`` on one node, ``ray start --address=HEAD:6379``
on the others, or KubeRay / ``ray up``), make the catalog directory and the model reachable at
the same path on every node (shared filesystem, or a hub id with a warm cache), then run
``midtrain featurize ... backend=ray ray.address=auto ray.num_actors=8 ray.gpus_per_actor=1``
on the head node. See ``docs/featurize-ray.md``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Iterator

import numpy as np

from ..runs import StageError, StageRun
from .featurizer import FeatureExtractor, PreparedBatch, ShardSink, ShardStart, Throughput


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise StageError("backend: ray needs Ray Data: pip install 'midtrain[ray]' (ray[data]>=2.40)") from None
    return ray


class ShardPreparer:
    """Ray Data UDF (CPU actor): one input row ``{shard, start, end}`` -> one output row per item."""

    def __init__(self, config_dict: dict, catalog_root: str):
        from ..config import from_dict
        from ..models.loading import load_processor
        from .config import FeaturizeConfig
        from .featurizer import make_preparer
        from .shards import CatalogIndex

        config = from_dict(FeaturizeConfig, config_dict)
        processor = load_processor(config.model, config.trust_remote_code, **config.processor_kwargs)
        self.preparer = make_preparer(config, processor)
        self.index = CatalogIndex.open(catalog_root)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        from .shards import FEATURIZE_COLUMNS

        for shard, start, end in zip(batch["shard"], batch["start"], batch["end"]):
            table = self.index.read_rows(int(start), int(end), FEATURIZE_COLUMNS)
            for item in self.preparer.prepare_shard(int(shard), table):
                yield {"shard": np.array([int(shard)]), "payload": np.array([pickle.dumps(item)], dtype=object)}


class FeaturizeActor:
    """Ray Data UDF (one model per actor): prepared batch -> pooled float32 features."""

    def __init__(self, config_dict: dict, device: str):
        from ..config import from_dict
        from ..models.loading import load_vlm
        from .config import FeaturizeConfig

        config = from_dict(FeaturizeConfig, config_dict)
        model, _ = load_vlm(config.model, config.dtype, device, config.attn_implementation, config.trust_remote_code)
        self.extractor = FeatureExtractor(model, config.pooling, compile=config.compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = []
        for payload in batch["payload"]:
            item = pickle.loads(payload)
            feats = counts = None
            if isinstance(item, PreparedBatch) and item.inputs is not None:
                feats, counts = self.extractor(item.inputs)
                item.inputs = None  # the driver needs the bookkeeping, not the pixels
            out.append(pickle.dumps((item, feats, counts)))
        return {"shard": batch["shard"], "payload": np.array(out, dtype=object)}


def run_ray(config, st: StageRun, index, pending: list[tuple[int, int, int]], sink: ShardSink) -> dict:
    """Featurize the ``pending`` shards on Ray; the driver (this process) writes every shard."""
    ray = _import_ray()
    from ray.data import ActorPoolStrategy

    opts = config.ray
    if not ray.is_initialized():
        ray.init(address=opts.address, include_dashboard=False, log_to_driver=False)
    if os.environ.get("MIDTRAIN_PROGRESS") == "off":
        ray.data.DataContext.get_current().enable_progress_bars = False
    device = "cuda" if opts.gpus_per_actor > 0 else "cpu"
    config_dict = config.to_dict()
    shards = ray.data.from_items(
        [{"shard": k, "start": a, "end": b} for k, a, b in pending], override_num_blocks=max(1, len(pending))
    )
    prepared = shards.map_batches(
        ShardPreparer, batch_size=1, fn_constructor_kwargs={"config_dict": config_dict, "catalog_root": str(index.root)},
        compute=ActorPoolStrategy(size=opts.num_preprocess_actors), num_cpus=opts.cpus_per_preprocess_actor,
    )  # fmt: skip
    featurized = prepared.map_batches(
        FeaturizeActor, batch_size=1, fn_constructor_kwargs={"config_dict": config_dict, "device": device},
        compute=ActorPoolStrategy(size=opts.num_actors), num_cpus=opts.cpus_per_actor, num_gpus=opts.gpus_per_actor,
    )  # fmt: skip
    st.log.info(
        "ray: %d shard(s) on %d model actor(s) (%s GPU, %s CPU each) fed by %d preprocessing actor(s)",
        len(pending), opts.num_actors, opts.gpus_per_actor, opts.cpus_per_actor, opts.num_preprocess_actors,
    )  # fmt: skip
    throughput = Throughput()
    early: dict[int, list] = {}  # batches that overtook their shard's ShardStart
    with st.progress(total=sum(b - a for _, a, b in pending), desc="featurize (ray)", unit="sample") as bar:
        for row in featurized.iter_rows():
            item, feats, counts = pickle.loads(row["payload"])
            if isinstance(item, ShardStart):
                sink.start(item)
                for waiting in early.pop(item.shard, []):
                    sink.add(*waiting)
                continue
            if item.shard not in sink.open:
                early.setdefault(item.shard, []).append((item, feats, counts))
            else:
                sink.add(item, feats, counts)
            throughput.add(item)
            bar.update(len(item.positions) + len(item.errors))
    if early:
        raise StageError(f"featurize (ray): batches of shards {sorted(early)} arrived without their shard header")
    return throughput.summary()
