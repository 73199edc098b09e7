"""Synthetic run directories for the fit, score, select and export tests: a catalog, a feature
run and helpers, plus the fixtures their ``conftest.py`` files import.

Features are Gaussian so the density ratio is known: pool source ``near`` sits closer to
the VLA mean than ``far``; the estimator should prefer ``near``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from midtrain.config import StageConfig
from midtrain.data.catalog import rows_to_table
from midtrain.data.features import shard_name, write_feature_shard
from midtrain.data.images import encode_image, ref_from_bytes, ref_from_path
from midtrain.runs import RunDir, stage_run, write_parquet_atomic


@dataclass
class FakeCatalogConfig(StageConfig):
    note: str = "synthetic catalog"


@dataclass
class FakeFeaturizeConfig(StageConfig):
    dim: int = 16
    variant: str = "a"


def vlm_row(source: str, i: int, image_ref: dict | None) -> dict:
    return {
        "id": f"{source}/{i}", "source": source, "kind": "vlm",
        "image_refs": [image_ref] if image_ref else [],
        "messages": [{"role": "user", "content": f"<image>\nWhere is object {i} of {source}?"},
                     {"role": "assistant", "content": f"On the left, {source} {i}."}],
        "origin": f"{source}.json:{i + 1}",
    }  # fmt: skip


def vla_row(i: int) -> dict:
    return {"id": f"robot/{i}", "source": "robot", "kind": "vla", "instruction": "pick the block",
            "episode": i // 10, "frame": i % 10, "state": [0.0] * 4, "action": [[0.1] * 4] * 2,
            "action_mask": [True, True], "origin": f"episode {i // 10} frame {i % 10}"}  # fmt: skip


def write_catalog(run: RunDir, rows_by_source: dict[str, list[dict]]) -> None:
    with stage_run(run, "catalog", FakeCatalogConfig(), kind="catalog") as st:
        for source, rows in rows_by_source.items():
            write_parquet_atomic(st.dir / source / "part-00000.parquet", rows_to_table(rows))


def gaussian_features(n_near: int, n_far: int, n_vla: int, dim: int, seed: int = 0):
    """(near, far, vla) float32 arrays: far ~ N(0, I), near ~ N(0.75 mu, I), vla ~ N(mu, I)."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(dim)
    mu[:4] = 1.5
    far = rng.standard_normal((n_far, dim))
    near = rng.standard_normal((n_near, dim)) + 0.75 * mu
    vla = rng.standard_normal((n_vla, dim)) + mu
    return near.astype(np.float32), far.astype(np.float32), vla.astype(np.float32)


def write_features(run: RunDir, blocks: list[tuple[str, str, np.ndarray]], shard_rows: int = 100,
                   config: StageConfig | None = None, ids_of=None) -> None:  # fmt: skip
    """Write (source, kind, features) blocks into a featurize stage, interleaving them
    across shards of ``shard_rows`` rows (so shards mix pool and VLA rows)."""
    ids, sources, kinds, feats = [], [], [], []
    for source, kind, x in blocks:
        for i in range(len(x)):
            ids.append(ids_of(source, i) if ids_of else f"{source}/{i}")
            sources.append(source)
            kinds.append(kind)
        feats.append(x)
    X = np.concatenate(feats)
    perm = np.random.default_rng(1).permutation(len(X))
    with stage_run(run, "featurize", config or FakeFeaturizeConfig(dim=X.shape[1]), kind="featurize") as st:
        for s, start in enumerate(range(0, len(X), shard_rows)):
            rows = perm[start : start + shard_rows]
            table = pa.table({"id": [ids[r] for r in rows], "source": [sources[r] for r in rows], "kind": [kinds[r] for r in rows]})
            write_feature_shard(st.dir / "shards", shard_name(s), X[rows], table)
        st.extra.update({"dim": int(X.shape[1]), "model": "synthetic", "pooling": "mean"})


def build_run(tmp_path, n_near=150, n_far=250, n_vla=200, dim=16, image_files: bool = True, seed: int = 0) -> RunDir:
    """A run with a catalog (VLM rows with images: PNG files for ``far``, embedded bytes for
    ``near``) and a complete featurize stage."""
    run = RunDir(tmp_path / "run")
    near, far, vla = gaussian_features(n_near, n_far, n_vla, dim, seed)
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    rows = {"near": [], "far": [], "robot": [vla_row(i) for i in range(n_vla)]}
    for i in range(n_near):
        rows["near"].append(vlm_row("near", i, ref_from_bytes(encode_image(np.full((8, 8, 3), i % 250, np.uint8)))))
    for i in range(n_far):
        path = img_dir / f"far_{i}.png"
        if image_files:
            path.write_bytes(encode_image(np.full((8, 8, 3), (i * 7) % 250, np.uint8)))
        rows["far"].append(vlm_row("far", i, ref_from_path(path)))
    write_catalog(run, rows)
    write_features(run, [("near", "vlm", near), ("far", "vlm", far), ("robot", "vla", vla)])
    return run


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models and matrices: one intra-op thread is as fast, and does not collapse when
    other processes share the cores (restored after each module)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_run(tmp_path):
    return build_run(tmp_path)
