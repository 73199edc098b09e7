"""Every bad-input case of the catalog stage: a clear error by default, a recorded skip with on_error: skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from catalog_fixtures import llava_records, write_png

from midtrain.cli import run_stage
from midtrain.config import ConfigError
from midtrain.runs import SampleError, StageError


def run_catalog(tmp_path: Path, datasets: list[dict], on_error: str = "raise", **cfg) -> Path:
    base = {"datasets": datasets, "on_error": on_error, **cfg}
    return run_stage("catalog", tmp_path / "run", None, [], base=base)


def jsonl_source(tmp_path: Path, mutate) -> dict:
    """A 6-record JSONL source after ``mutate(lines, image_dir)`` edits its lines (1-based line = index+1)."""
    root = tmp_path / "src"
    lines = [json.dumps(r) for r in llava_records(root / "images")]
    mutate(lines, root / "images")
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return {"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(root / "data.jsonl")}


def _missing_image(lines, images):
    (images / "img3.png").unlink()


def _undecodable_image(lines, images):
    (images / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


def _malformed_line(lines, images):
    lines[3] = lines[3][:-5]


def _missing_field(lines, images):
    lines[3] = json.dumps({"id": "s3", "image": "images/img3.png"})


CASES = [
    (_missing_image, "missing image file", "img3.png"),
    (_undecodable_image, "undecodable image", "img3.png"),
    (_malformed_line, "malformed JSON", ""),
    (_missing_field, "missing required field", "conversations"),
]


@pytest.mark.parametrize("mutate,reason,detail", CASES, ids=[c[1] for c in CASES])
def test_bad_sample_raises_naming_file_and_line(tmp_path, mutate, reason, detail):
    src = jsonl_source(tmp_path, mutate)
    with pytest.raises(SampleError) as exc:
        run_catalog(tmp_path, [src])
    assert exc.value.reason == reason
    assert exc.value.where == f"{src['path']}:4"
    assert str(exc.value).startswith(f"{src['path']}:4: {reason}") and detail in str(exc.value)
    manifest = json.loads((tmp_path / "run/.partial/catalog/manifest.json").read_text())  # the failed attempt
    assert manifest["status"] == "failed" and reason in manifest["error"]


@pytest.mark.parametrize("mutate,reason,detail", CASES, ids=[c[1] for c in CASES])
def test_bad_sample_is_skipped_and_recorded(tmp_path, mutate, reason, detail):
    src = jsonl_source(tmp_path, mutate)
    out = run_catalog(tmp_path, [src], on_error="skip")
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1
    assert errors[0]["reason"] == reason and errors[0]["where"] == f"{src['path']}:4"
    assert detail in errors[0]["detail"]
    if reason != "malformed JSON":
        assert errors[0]["id"] == "pool/s3"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {reason: 1} and manifest["counts"]["written"] == 5
    assert manifest["sources"]["pool"] | {"read": 6, "written": 5, "skipped": 1} == manifest["sources"]["pool"]


@pytest.mark.parametrize("fmt,content", [("llava_jsonl", "\n\n"), ("llava_json", "[]")])
def test_empty_dataset(tmp_path, fmt, content):
    path = tmp_path / f"empty.{'jsonl' if fmt == 'llava_jsonl' else 'json'}"
    path.write_text(content)
    empty = {"name": "empty", "kind": "vlm", "format": fmt, "path": str(path)}
    with pytest.raises(SampleError, match=f"{path}: empty dataset"):
        run_catalog(tmp_path, [empty])
    good = jsonl_source(tmp_path, lambda lines, images: None)
    out = run_catalog(tmp_path, [empty, good], on_error="skip")
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["reason"], e["where"]) for e in errors] == [("empty dataset", str(path))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == {"empty dataset": 1} and manifest["num_rows"] == 6
    assert manifest["sources"]["empty"] | {"read": 0, "written": 0, "skipped": 1, "parts": 0} == manifest["sources"]["empty"]
    # nothing at all to write is an error even when skipping
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(StageError, match="no samples were written"):
        run_catalog(tmp_path, [empty], on_error="skip")


def test_unknown_format_names_the_key(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ConfigError) as exc:
        run_catalog(tmp_path, [{"name": "x", "kind": "vlm", "format": "csv", "path": str(tmp_path / "d.csv")}])
    assert "datasets[0].format: expected 'llava_json' | 'llava_jsonl' | 'parquet' | 'hf_disk' | 'lerobot', got 'csv'" in str(exc.value)


def test_missing_path_names_the_source(tmp_path):
    with pytest.raises(StageError, match=r"datasets\[0\].path: .*nope.json not found \(source 'x'\)"):
        run_catalog(tmp_path, [{"name": "x", "kind": "vlm", "format": "llava_json", "path": str(tmp_path / "nope.json")}])


def _lerobot_missing_video(tmp_path: Path, lerobot_v3) -> dict:
    """Copy of the v3 fixture whose wrist video file is gone (all 3 episodes live in that file)."""
    root = tmp_path / "robot"
    shutil.copytree(lerobot_v3[0], root)
    (root / "videos/observation.images.wrist/chunk-000/file-000.mp4").unlink()
    return {"name": "robot", "kind": "vla", "format": "lerobot", "path": str(root)}


def test_lerobot_missing_video_raises_naming_episode_and_file(tmp_path, lerobot_v3):
    src = _lerobot_missing_video(tmp_path, lerobot_v3)
    with pytest.raises(SampleError) as exc:
        run_catalog(tmp_path, [src])
    assert exc.value.reason == "missing video file"
    assert exc.value.where == f"{src['path']} episode 0"
    assert "observation.images.wrist" in exc.value.detail and "file-000.mp4" in exc.value.detail


def test_lerobot_missing_video_skips_the_episodes(tmp_path, lerobot_v3):
    src = _lerobot_missing_video(tmp_path, lerobot_v3)
    # the corner camera alone still works; with both cameras every episode is skipped and recorded
    ok = run_catalog(tmp_path, [{**src, "cameras": ["observation.images.corner"]}], on_error="skip")
    assert json.loads((ok / "manifest.json").read_text())["num_rows"] == 21
    good = jsonl_source(tmp_path, lambda lines, images: None)
    out = run_stage("catalog", tmp_path / "run2", None, [], base={"datasets": [src, good], "on_error": "skip"})
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["where"] for e in errors] == [f"{src['path']} episode {e}" for e in range(3)]
    assert {e["reason"] for e in errors} == {"missing video file"}
    assert "9 frame(s) of this episode skipped" in errors[0]["detail"] and [e.get("samples") for e in errors] == [9, 5, 7]
    manifest = json.loads((out / "manifest.json").read_text())
    # an episode skipped for its video counts its frames as read and skipped, not one sample
    robot = manifest["sources"]["robot"]
    assert (robot["read"], robot["written"], robot["skipped"]) == (21, 0, 21)
    assert manifest["counts"]["skipped"] == {"missing video file": 21}


def test_undecodable_image_file_in_parquet_paths_is_caught(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_png(tmp_path / "ok.png", 3)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    pq.write_table(pa.table({"image": ["ok.png", "bad.png"], "caption": ["a", "b"]}), tmp_path / "c.parquet")
    src = {"name": "caps", "kind": "vlm", "format": "parquet", "path": str(tmp_path / "c.parquet")}
    with pytest.raises(SampleError, match=r"c.parquet:row 1: undecodable image"):
        run_catalog(tmp_path, [src])


@pytest.mark.parametrize("key, template", [
    ("video_path", "../outside/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"),
    ("data_path", "/tmp/elsewhere/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"),
])  # fmt: skip
def test_lerobot_metadata_paths_outside_the_root_are_sample_errors(tmp_path, lerobot_v3, key, template):
    root = tmp_path / "robot"
    shutil.copytree(lerobot_v3[0], root)
    if key == "video_path":  # the frames really are there: only the template leads out of the root
        shutil.copytree(root / "videos", tmp_path / "outside")
    info = json.loads((root / "meta/info.json").read_text())
    info[key] = template
    (root / "meta/info.json").write_text(json.dumps(info))
    src = {"name": "robot", "kind": "vla", "format": "lerobot", "path": str(root)}
    with pytest.raises(SampleError) as exc:
        run_catalog(tmp_path, [src])
    assert exc.value.reason == "path outside root" and exc.value.where == f"{root} episode 0"
    assert f"is outside the dataset root {root} (a data_path/video_path template of meta/info.json); set allow_outside_root: true" in exc.value.detail
    good = jsonl_source(tmp_path, lambda lines, images: None)
    out = run_catalog(tmp_path, [src, good], on_error="skip")
    assert json.loads((out / "manifest.json").read_text())["counts"]["skipped"] == {"path outside root": 21}
    if key == "video_path":
        allowed = run_stage("catalog", tmp_path / "allowed", None, [],
                            base={"datasets": [{**src, "allow_outside_root": True}]})
        assert json.loads((allowed / "manifest.json").read_text())["num_rows"] == 21


def test_an_empty_answer_is_a_sample_error(tmp_path):
    def empty_answers(lines, images):
        rec = json.loads(lines[2])
        for turn in rec["conversations"]:
            if turn["from"] == "gpt":
                turn["value"] = "  "
        lines[2] = json.dumps(rec)

    src = jsonl_source(tmp_path, empty_answers)
    with pytest.raises(SampleError, match=r"data.jsonl:3: empty answer \(every assistant turn is empty\)"):
        run_catalog(tmp_path, [src])
    out = run_catalog(tmp_path, [src], on_error="skip")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_rows"] == 5 and manifest["counts"]["skipped"] == {"empty answer": 1}
