"""``midtrain export``: LLaVA/ShareGPT JSON(L) with images, LLaMA-Factory entry, Parquet; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_fixtures import build_run

from midtrain.runs import RunDir, SampleError, StageError
from midtrain.export.config import ExportConfig
from midtrain.export.stage import export_mixture
from midtrain.select.config import SelectConfig
from midtrain.select.stage import select_mixture


@pytest.fixture
def run_copy(tmp_path):
    """A run whose selection is given directly (random scores): export does not care how it was made."""
    run = build_run(tmp_path, n_near=30, n_far=30, n_vla=10)
    ids = [f"near/{i}" for i in range(30)] + [f"far/{i}" for i in range(30)]
    scores = np.random.default_rng(0).uniform(size=60)
    (tmp_path / "scores").mkdir()
    pq.write_table(pa.table({"id": ids, "source": [i.split("/")[0] for i in ids], "score": scores}),
                   tmp_path / "scores" / "proximity_scores.parquet")  # fmt: skip
    select_mixture(SelectConfig(k=12, scores=tmp_path / "scores" / "proximity_scores.parquet", report=False), run)
    return run


def chosen(run: RunDir) -> set[str]:
    t = pq.read_table(run.stage_dir("select") / "selection.parquet")
    return set(t.filter(t.column("selected")).column("id").to_pylist())


def test_export_writes_sharegpt_json_images_dataset_info_and_parquet(run_copy):
    out = export_mixture(ExportConfig(), run_copy)
    records = json.loads((out / "mixture.json").read_text())
    assert {r["id"] for r in records} == chosen(run_copy) and len(records) == 12
    for r in records:
        assert r["conversations"][0]["from"] == "human" and r["conversations"][1]["from"] == "gpt"
        assert r["conversations"][0]["value"].startswith("<image>")
        img = out / r["image"]
        assert img.is_file() and img.read_bytes()[:4] == b"\x89PNG" and not img.is_symlink()
    info = json.loads((out / "dataset_info.json").read_text())["midtrain_mixture"]
    assert info["file_name"] == "mixture.json" and info["formatting"] == "sharegpt"
    assert info["columns"]["messages"] == "conversations"
    assert info["tags"] == {**info["tags"], "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    table = pq.read_table(out / "mixture.parquet")
    assert set(table.column("id").to_pylist()) == chosen(run_copy)
    assert run_copy.manifest("export")["counts"]["written"] == 12


def test_export_jsonl_with_linked_images(run_copy):
    out = export_mixture(ExportConfig(format="jsonl", image_mode="link", dataset_name="near_robot", parquet=False), run_copy)
    lines = (out / "mixture.jsonl").read_text().splitlines()
    assert len(lines) == 12 and not (out / "mixture.parquet").exists()
    records = [json.loads(x) for x in lines]
    assert all((out / r["image"]).is_file() for r in records)
    n_far = sum(r["id"].startswith("far/") for r in records)
    links = [p for p in (out / "images").iterdir() if p.is_symlink()]
    assert len(links) == n_far > 0  # file images are linked, embedded ones written
    assert "near_robot" in json.loads((out / "dataset_info.json").read_text())


def test_selection_from_another_run_is_rejected(run_copy, tmp_path):
    pq.write_table(pa.table({"id": ["near/0", "elsewhere/7"], "source": ["near", "elsewhere"], "score": [0.5, 0.4],
                             "rank": [1, 2], "selected": [True, True]}), tmp_path / "sel.parquet")  # fmt: skip
    with pytest.raises(StageError, match=r"1 selected id\(s\) are not in the catalog .*first: elsewhere/7"):
        export_mixture(ExportConfig(selection=tmp_path / "sel.parquet"), run_copy)


def test_missing_image_files_are_named_or_skipped(run_copy):
    missing = sorted(i for i in chosen(run_copy) if i.startswith("far/"))[0]
    (run_copy.root.parent / "images" / f"far_{missing.split('/')[1]}.png").unlink()
    with pytest.raises(SampleError, match=rf"far.json:\d+: missing image file"):
        export_mixture(ExportConfig(), run_copy)
    out = export_mixture(ExportConfig(on_error="skip"), run_copy)
    records = json.loads((out / "mixture.json").read_text())
    assert len(records) == 11 and missing not in {r["id"] for r in records}
    assert set(pq.read_table(out / "mixture.parquet").column("id").to_pylist()) == {r["id"] for r in records}
    assert run_copy.manifest("export")["counts"]["skipped"] == {"missing image file": 1}
