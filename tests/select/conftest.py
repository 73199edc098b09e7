"""Synthetic run directories for the select package: a catalog, a feature run and helpers.

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
from select_fixtures import FakeCatalogConfig, FakeFeaturizeConfig, vlm_row, vla_row, write_catalog, gaussian_features, write_features, build_run  # noqa: F401,E402


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
