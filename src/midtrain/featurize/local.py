"""Local backend: DataLoader workers prepare batches while the main process runs the model.

Each worker owns every ``num_workers``-th pending shard (like a datatrove rank): it reads the
shard's row groups, decodes images, renders chat templates and runs the processor, and yields a
:class:`~.featurizer.ShardStart` then the shard's batches. The DataLoader interleaves workers'
items; the main process runs the backbone on each batch as it arrives and the
:class:`~.featurizer.ShardSink` writes every shard once its last batch is in. So image decoding
and processing overlap the model, each catalog row is read once, and nothing per sample runs in
Python in the model loop.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from .featurizer import BatchPreparer, FeatureExtractor, PreparedBatch, ShardStart
from .shards import FEATURIZE_COLUMNS, CatalogIndex


class ShardStream(torch.utils.data.IterableDataset):
    """An ``IterableDataset`` of prepared items for the pending shards, split across workers.

    ``shards``: ``[(shard_number, start_row, end_row)]``.
    """

    def __init__(self, index: CatalogIndex, shards: list[tuple[int, int, int]], preparer: BatchPreparer):
        self.index = index
        self.shards = shards
        self.preparer = preparer

    def __iter__(self) -> Iterator[ShardStart | PreparedBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, (shard, start, end) in enumerate(self.shards):
            if k % workers != worker:
                continue
            table = self.index.read_rows(start, end, FEATURIZE_COLUMNS)
            yield from self.preparer.prepare_shard(shard, table)


def iter_prepared(stream: ShardStream, num_workers: int, prefetch_factor: int = 4, pin_memory: bool = False):
    """Prepared items from ``num_workers`` DataLoader worker processes (0: in this process)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes already
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return iter(loader)


def iter_features(stream: ShardStream, extractor: FeatureExtractor, num_workers: int, prefetch_factor: int = 4):
    """``(item, features, counts)`` for every prepared item, the model running as items arrive.

    ``features``/``counts`` are None for a :class:`ShardStart` and for a batch with no rows left.
    """
    pin = extractor.device.type == "cuda"
    for item in iter_prepared(stream, num_workers, prefetch_factor, pin):
        if isinstance(item, PreparedBatch) and item.inputs is not None:
            feats, counts = extractor(item.inputs)
            yield item, feats, counts
        else:
            yield item, None, None
