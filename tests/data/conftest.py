"""Fixtures of the catalog tests: a LLaVA folder per test, one LeRobot v3.0 dataset per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from catalog_fixtures import llava_records, make_lerobot_v3


@pytest.fixture
def llava_dir(tmp_path: Path) -> Path:
    root = tmp_path / "llava"
    recs = llava_records(root / "images")
    (root / "data.json").write_text(json.dumps(recs))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


@pytest.fixture(scope="session")
def lerobot_v3(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("lerobot") / "v3"
    return root, make_lerobot_v3(root)
