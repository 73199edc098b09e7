"""Synthetic feature directories for the gap tests (Gaussian clouds per source, written as real shards)
and the fixtures the gap test modules import.

A uniquely named module rather than a ``conftest.py``: test modules elsewhere do
``from conftest import ...``, which resolves to whichever ``conftest`` was imported last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from midtrain.data.features import shard_name, write_feature_shard

# source -> (kind, mean offset along every dimension, rows)
SOURCES = {
    "caption_web": ("vlm", 0.0, 150),
    "spatial_vqa": ("vlm", 0.6, 150),  # lies between the general VLM data and the robot data
    "chart_qa": ("vlm", -0.3, 120),
    "robot_a": ("vla", 1.2, 140),
    "robot_b": ("vla", 1.3, 130),
}
DIM = 16


def write_features(
    root: Path, sources: dict = SOURCES, dim: int = DIM, rows_per_shard: int = 200, seed: int = 0, mutate=None
) -> Path:
    """Write a features directory (shards mixing sources, rows shuffled) and return it.

    ``mutate(features, ids)`` may edit the pooled arrays before they are sharded.
    """
    rng = np.random.default_rng(seed)
    feats, ids, srcs, kinds = [], [], [], []
    for source, (kind, shift, rows) in sources.items():
        feats.append(rng.normal(shift, 1.0, size=(rows, dim)).astype(np.float32))
        ids += [f"{source}-{i}" for i in range(rows)]
        srcs += [source] * rows
        kinds += [kind] * rows
    x = np.concatenate(feats)
    order = rng.permutation(len(x))
    x, ids, srcs, kinds = x[order], [ids[i] for i in order], [srcs[i] for i in order], [kinds[i] for i in order]
    if mutate is not None:
        mutate(x, ids)
    shards = root / "shards"
    for k, start in enumerate(range(0, len(x), rows_per_shard)):
        sl = slice(start, start + rows_per_shard)
        table = pa.table({"id": ids[sl], "source": srcs[sl], "kind": kinds[sl]})
        write_feature_shard(shards, shard_name(k), x[sl], table)
    return root


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The gap tests use small matrices: one thread avoids OpenMP spin-waiting on a shared, busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
