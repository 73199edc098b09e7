"""The catalog stage: parts and row groups, manifest per source, ids, resume at part and source granularity."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from catalog_fixtures import interrupt_second_part, llava_records

import midtrain.catalog.stage as build
from midtrain.cli import run_stage
from midtrain.config import ConfigError, load_config
from midtrain.catalog.config import CatalogConfig
from midtrain.data.catalog import CATALOG_SCHEMA, catalog_files, catalog_num_rows, iter_catalog
from midtrain.runs import StageError


@pytest.fixture
def sources(tmp_path, llava_dir, lerobot_v3) -> list[dict]:
    return [
        {"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(llava_dir / "data.jsonl")},
        {"name": "robot", "kind": "vla", "format": "lerobot", "path": str(lerobot_v3[0]), "frame_stride": 2},
    ]


def run(tmp_path: Path, datasets: list[dict], force: bool = False, **cfg) -> Path:
    return run_stage("catalog", tmp_path / "run", None, [], force=force, base={"datasets": datasets, **cfg})


def test_parts_row_groups_schema_and_manifest(tmp_path, sources):
    out = run(tmp_path, sources, rows_per_part=4, row_group_size=2)
    files = catalog_files(out)
    assert [f.relative_to(out).as_posix() for f in files] == [
        "pool/part-00000.parquet", "pool/part-00001.parquet",
        "robot/part-00000.parquet", "robot/part-00001.parquet", "robot/part-00002.parquet",
    ]  # fmt: skip
    meta = pq.ParquetFile(files[0])
    assert meta.schema_arrow.equals(CATALOG_SCHEMA) and meta.metadata.num_rows == 4 and meta.num_row_groups == 2
    assert catalog_num_rows(out) == 6 + 12
    ids = [i for b in iter_catalog(out, columns=["id"]) for i in b.column("id").to_pylist()]
    assert len(set(ids)) == len(ids) and "pool/s0" in ids and "robot/2/6" in ids
    kinds = {r["source"]: r["kind"] for b in iter_catalog(out, columns=["source", "kind"]) for r in b.to_pylist()}
    assert kinds == {"pool": "vlm", "robot": "vla"}
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["num_rows"] == 18
    assert m["sources"]["robot"] == {"kind": "vla", "format": "lerobot", "path": sources[1]["path"],
                                     "read": 12, "written": 12, "skipped": 0, "parts": 3}
    assert m["counts"]["read"] == 18 and m["counts"]["written"] == 18
    assert {i["path"] for i in m["inputs"]} == {str(Path(s["path"]).resolve()) for s in sources}


def test_complete_stage_is_skipped_and_force_recomputes(tmp_path, sources, caplog):
    out = run(tmp_path, sources[:1])
    part = out / "pool/part-00000.parquet"
    stamp = part.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="midtrain"):
        run(tmp_path, sources[:1])
    assert "complete with the same config and inputs; nothing to do" in caplog.text
    assert part.stat().st_mtime_ns == stamp
    run(tmp_path, sources[:1], force=True)
    assert part.stat().st_mtime_ns != stamp


def test_interrupted_run_resumes_after_done_parts(tmp_path, sources, monkeypatch):
    real = build._write_part
    interrupt_second_part(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, sources, rows_per_part=4)
    attempt = tmp_path / "run/.partial/catalog"  # a failed run publishes nothing
    assert json.loads((attempt / "manifest.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run/catalog").exists()
    stamp = (attempt / "pool/part-00000.parquet").stat().st_mtime_ns
    assert not (attempt / "pool/part-00001.parquet").exists()

    monkeypatch.setattr(build, "_write_part", real)
    out = run(tmp_path, sources, rows_per_part=4)
    assert (out / "pool/part-00000.parquet").stat().st_mtime_ns == stamp  # the finished part was not rewritten
    ids = [i for b in iter_catalog(out, columns=["id"]) for i in b.column("id").to_pylist()]
    assert ids[:6] == ["pool/s0", "pool/s1", "pool/2", "pool/s3", "pool/s4", "pool/5"] and len(ids) == 18
    m = json.loads((out / "manifest.json").read_text())
    assert m["sources"]["pool"]["read"] == 6 and m["counts"]["written"] == 18
    assert "resuming after 1 done part(s) at position 4" in (out / "log.txt").read_text()


def test_finished_source_is_not_read_again_on_resume(tmp_path, sources, monkeypatch):
    opened = []
    real_open = build.open_reader

    def spy(source, seed):
        opened.append(source.name)
        if source.name == "robot" and len(opened) == 2:
            raise KeyboardInterrupt
        return real_open(source, seed)

    monkeypatch.setattr(build, "open_reader", spy)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, sources)
    out = run(tmp_path, sources)
    assert opened == ["pool", "robot", "robot"]
    assert json.loads((out / "manifest.json").read_text())["sources"]["pool"]["written"] == 6


def test_changed_input_file_reruns(tmp_path, sources):
    path = Path(sources[0]["path"])
    run(tmp_path, sources[:1])
    recs = [json.loads(line) for line in path.read_text().splitlines()][:3]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = run(tmp_path, sources[:1])
    assert catalog_num_rows(out) == 3


def test_duplicate_ids_name_both_records_and_the_fix(tmp_path, llava_dir):
    recs = llava_records(llava_dir / "images")
    recs[4]["id"] = "s0"
    (llava_dir / "dup.json").write_text(json.dumps(recs))
    src = {"name": "dup", "kind": "vlm", "format": "llava_json", "path": str(llava_dir / "dup.json")}
    with pytest.raises(StageError) as exc:
        run(tmp_path, [src])
    msg = str(exc.value)
    assert "duplicate sample id 'dup/s0'" in msg and "dup.json[0]" in msg and "dup.json[4]" in msg
    assert "datasets[0].id_field: null" in msg
    out = run(tmp_path, [{**src, "id_field": None}])
    assert [i for b in iter_catalog(out, columns=["id"]) for i in b.column("id").to_pylist()][4] == "dup/4"


@pytest.mark.parametrize(
    "datasets,message",
    [
        ([], "datasets: at least one dataset source is required"),
        ([{"name": "a", "kind": "vlm", "format": "parquet", "path": "x"},
          {"name": "a", "kind": "vlm", "format": "parquet", "path": "y"}],
         "datasets[1].name: duplicate source name 'a' (also datasets[0])"),
        ([{"name": "a/b", "kind": "vlm", "format": "parquet", "path": "x"}], "datasets[0].name:"),
        ([{"name": "r", "kind": "vlm", "format": "lerobot", "path": "x"}], "datasets[0].kind: a lerobot source"),
        ([{"name": "r", "kind": "vla", "format": "lerobot", "path": "x", "chunk_size": 0}], "datasets[0].chunk_size"),
        ([{"name": "r", "kind": "vlm", "format": "parquet", "path": "x", "cameras": ["c"]}], "datasets[0].cameras"),
        ([{"name": "r", "kind": "vlm", "format": "parquet", "path": "x", "max_samples": "ten"}],
         "datasets[0].max_samples: expected int | null, got 'ten'"),
        ([{"name": "r", "kind": "vlm", "format": "parquet"}], "datasets[0].path: required key is missing"),
    ],
)
def test_config_errors_name_the_key(datasets, message):
    with pytest.raises(ConfigError) as exc:
        load_config(CatalogConfig, base={"datasets": datasets})
    assert message in str(exc.value)


def test_example_config_is_valid():
    cfg = load_config(CatalogConfig, Path(__file__).parents[2] / "configs" / "catalog.yaml")
    assert [s.format for s in cfg.datasets] == ["llava_json", "llava_jsonl", "hf_disk", "parquet", "lerobot"]
    assert cfg.datasets[3].id_field is None and cfg.datasets[4].chunk_size == 16
