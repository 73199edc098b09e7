"""Fixtures of the sft tests: one intra-op thread, and a run directory with a small catalog."""

from __future__ import annotations

import pytest
from catalog_rows import vla_rows, vlm_rows, write_catalog
from torch_threads import one_thread  # noqa: F401  (autouse)


@pytest.fixture
def catalog_run(tmp_path):
    """``<tmp>/run`` with a catalog of two VLM sources (40 and 30 conversations) and a VLA source."""
    from midtrain.runs import RunDir

    run = RunDir(tmp_path / "run")
    write_catalog(run.root, {"llava": vlm_rows(40), "spatial": vlm_rows(30, "spatial", seed=3), "robot": vla_rows(16)})
    return run
