"""Issue 17, item 3 (catalog half): content, not names, decides "nothing to do".

The catalog's inputs are data files that name images; these tests replace an image and
check that the catalog notices, and that exactly the rows using it change ``content_hash``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from catalog_fixtures import interrupt_second_part, llava_records, write_png

import midtrain.catalog.stage as build
from midtrain.cli import run_stage
from midtrain.data.catalog import iter_catalog
from midtrain.runs import StageError


def source(tmp_path: Path) -> dict:
    root = tmp_path / "src"
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava_records(root / "images")))
    return {"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(root / "data.jsonl")}


def run(tmp_path: Path, src: dict, run_dir: str = "run", **cfg) -> Path:
    return run_stage("catalog", tmp_path / run_dir, None, [], base={"datasets": [src], **cfg})


def hashes(out: Path) -> dict[str, str]:
    return {r["id"]: r["content_hash"] for b in iter_catalog(out, columns=["id", "content_hash"]) for r in b.to_pylist()}


def nothing_to_do(out: Path) -> bool:
    return (out / "log.txt").read_text().rstrip().endswith("nothing to do (use --force to recompute)")


def test_replacing_an_image_changes_exactly_the_rows_that_use_it(tmp_path):
    src = source(tmp_path)
    out = run(tmp_path, src)
    before = hashes(out)
    assert len(set(before.values())) == 6 and all(len(h) == 32 for h in before.values())
    run(tmp_path, src)
    assert nothing_to_do(out)

    write_png(tmp_path / "src/images/img3.png", 123)  # same path, new pixels
    out = run(tmp_path, src)
    assert not nothing_to_do(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rerun_because"] == {
        "changed_references": 1, "of": 4, "examples": [str((tmp_path / "src/images/img3.png").resolve())]
    }  # fmt: skip
    after = hashes(out)
    assert [k for k in before if before[k] != after[k]] == ["pool/s3"]
    run(tmp_path, src)
    assert nothing_to_do(out)


def _same_size_png(path: Path) -> None:
    """Rewrite ``path`` with other pixels, the same byte size and the old mtime (a stat-invisible change)."""
    st, old = path.stat(), path.read_bytes()
    for value in range(1, 256):
        write_png(path, value)
        if path.stat().st_size == st.st_size and path.read_bytes() != old:
            break
    assert path.stat().st_size == st.st_size and path.read_bytes() != old
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_stat_fingerprints_miss_a_same_size_same_mtime_rewrite_and_verify_catches_it(tmp_path):
    src = source(tmp_path)
    image = tmp_path / "src/images/img3.png"
    stat_out = run(tmp_path, src, "stat")
    verify_out = run(tmp_path, src, "verify", verify_references=True)
    _same_size_png(image)
    run(tmp_path, src, "stat")
    assert nothing_to_do(stat_out)  # the documented trade-off of size + mtime
    before = hashes(verify_out)
    run(tmp_path, src, "verify", verify_references=True)
    assert not nothing_to_do(verify_out)
    after = hashes(verify_out)
    assert [k for k in before if before[k] != after[k]] == ["pool/s3"]


def test_resumed_run_rereads_a_source_whose_done_parts_name_changed_files(tmp_path, monkeypatch):
    src = source(tmp_path)
    real = build._write_part
    interrupt_second_part(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, src, rows_per_part=2)
    monkeypatch.setattr(build, "_write_part", real)
    write_png(tmp_path / "src/images/img0.png", 200)  # named by the done part 0
    out = run(tmp_path, src, rows_per_part=2)
    assert json.loads((out / "manifest.json").read_text())["rerun_because"]["changed_references"] == 1
    clean = run(tmp_path, src, "clean", rows_per_part=2)
    assert hashes(out) == hashes(clean)


def test_files_midtrain_did_not_write_are_not_deleted_by_a_rebuild(tmp_path):
    src = source(tmp_path)
    out = run(tmp_path, src)
    (out / "notes.txt").write_text("mine")
    write_png(tmp_path / "src/images/img1.png", 77)
    with pytest.raises(StageError, match=r"1 referenced file\(s\) changed .*notes.txt.*--force"):
        run(tmp_path, src)
    assert (out / "notes.txt").read_text() == "mine"


def test_lerobot_rows_hash_their_frames_deterministically(tmp_path, lerobot_v3):
    src = {"name": "robot", "kind": "vla", "format": "lerobot", "path": str(lerobot_v3[0]), "frame_stride": 3}
    a, b = hashes(run(tmp_path, src, "a")), hashes(run(tmp_path, src, "b"))
    assert a == b and len(set(a.values())) == len(a) == 3 + 2 + 3


def test_row_hash_is_content_not_identity(tmp_path):
    from midtrain.data.content import RowHasher

    hasher = RowHasher(verify=False)
    image = write_png(tmp_path / "a.png", 1)
    row = {"id": "s/1", "source": "s", "origin": "f:1", "kind": "vlm", "messages": [{"role": "user", "content": "<image>\nq"}],
           "image_refs": [{"path": str(image), "bytes": None}, {"path": None, "bytes": b"\x89PNG frame"}]}  # fmt: skip
    h = hasher(row)
    assert hasher({**row, "id": "t/9", "source": "t", "origin": "g:7"}) == h
    assert hasher({**row, "messages": [{"role": "user", "content": "<image>\nQ"}]}) != h
    assert hasher({**row, "image_refs": [row["image_refs"][0], {"path": None, "bytes": b"\x89PNG frame!"}]}) != h
    refs = hasher.references()
    assert refs.column("path").to_pylist() == [str(image)] and refs.column("size").to_pylist() == [image.stat().st_size]
    shutil.copy(image, tmp_path / "b.png")
    moved = {**row, "image_refs": [{"path": str(tmp_path / "b.png"), "bytes": None}, row["image_refs"][1]]}
    assert RowHasher(verify=True)(moved) == RowHasher(verify=True)(row)  # content mode: the bytes, not the name
