"""Issue 17, items 4 and 5: every per-sample failure of the readers is a per-sample error.

Each hostile or broken input below stops the catalog with a ``SampleError`` naming the
file and record (``on_error: raise``), or is recorded in ``errors.jsonl`` while every other
record is written (``on_error: skip``).
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_fixtures import llava_records, write_png

from midtrain.cli import run_stage
from midtrain.data.images import load_image
from midtrain.runs import SampleError


def run_catalog(tmp_path: Path, datasets: list[dict], on_error: str = "raise", run: str = "run") -> Path:
    return run_stage("catalog", tmp_path / run, None, [], base={"datasets": datasets, "on_error": on_error})


def errors_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def written(out: Path) -> int:
    return json.loads((out / "manifest.json").read_text())["num_rows"]


def jsonl_source(tmp_path: Path, lines: list[str], **keys) -> dict:
    path = tmp_path / "src" / "data.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines))
    return {"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(path), **keys}


def six_lines(tmp_path: Path) -> list[str]:
    return [json.dumps(r) for r in llava_records(tmp_path / "src" / "images")]


def assert_raises_then_skips(tmp_path: Path, src: dict, reason: str, where: str, detail: str, n_good: int, n_bad: int = 1):
    """The contract of every case: raise naming ``where``, or skip ``n_bad`` records and write the ``n_good`` others."""
    with pytest.raises(SampleError) as exc:
        run_catalog(tmp_path, [src])
    assert (exc.value.reason, exc.value.where) == (reason, where) and detail in exc.value.detail
    out = run_catalog(tmp_path, [src], on_error="skip", run="run-skip")
    errors = errors_of(out)
    assert [(e["reason"], e["where"]) for e in errors][:1] == [(reason, where)] and len(errors) == n_bad
    assert written(out) == n_good
    return errors


# --------------------------------------------------------------------------- images


def png_header(width: int, height: int) -> bytes:
    """A few hundred bytes that PIL opens as a ``width`` x ``height`` RGB PNG (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_one_bad_sample(tmp_path):
    lines = six_lines(tmp_path)
    (tmp_path / "src/images/img3.png").write_bytes(png_header(20_000, 20_000))
    src = jsonl_source(tmp_path, lines)
    assert_raises_then_skips(tmp_path, src, "image too large", f"{src['path']}:4", "max_image_pixels", n_good=5)


def test_pixel_limit_is_configurable_and_applies_where_images_are_decoded(tmp_path):
    lines = six_lines(tmp_path)  # 24 x 32 = 768-pixel images in records 0, 1, 3, 4
    out = run_catalog(tmp_path, [jsonl_source(tmp_path, lines, max_image_pixels=700)], on_error="skip")
    assert {e["reason"] for e in errors_of(out)} == {"image too large"} and written(out) == 2
    ref = {"path": str(tmp_path / "src/images/img0.png"), "bytes": None}
    assert load_image(ref, max_pixels=768).size == (32, 24)
    with pytest.raises(SampleError, match="image too large"):
        load_image(ref, "row 7", "s7", max_pixels=767)
    with pytest.raises(SampleError, match="image too large") as exc:
        load_image({"path": None, "bytes": png_header(20_000, 20_000)}, "row 8", "s8")  # featurize's default limit
    assert exc.value.where == "row 8" and exc.value.sample_id == "s8"


@pytest.mark.parametrize("path", ["../secret/private.png", "ABS", "~/private.png", "images/../../secret/private.png"])
def test_image_paths_stay_inside_their_root(tmp_path, path):
    secret = write_png(tmp_path / "secret/private.png", 99)
    lines = six_lines(tmp_path)
    value = str(secret) if path == "ABS" else path
    lines[0] = lines[0].replace("images/img0.png", value)
    src = jsonl_source(tmp_path, lines)
    errors = assert_raises_then_skips(tmp_path, src, "image path outside root", f"{src['path']}:1", value, n_good=5)
    assert "allow_outside_root" in errors[0]["detail"]
    if path != "~/private.png":  # opting in reads it (a '~' path names this user's home, not the fixture)
        out = run_catalog(tmp_path, [{**src, "allow_outside_root": True}], run="run-allowed")
        assert written(out) == 6


def test_paths_inside_the_root_are_accepted_however_written(tmp_path):
    lines = six_lines(tmp_path)
    root = tmp_path / "src"
    lines[0] = lines[0].replace("images/img0.png", "images/../images/./img0.png")
    lines[1] = lines[1].replace("images/img1.png", str(root / "images/img1.png"))  # absolute, but inside
    assert written(run_catalog(tmp_path, [jsonl_source(tmp_path, lines)])) == 6


# --------------------------------------------------------------------------- text


def test_lone_surrogate_is_undecodable_text(tmp_path):
    lines = six_lines(tmp_path)
    lines[2] = lines[2].replace("Say 2", "Say \\ud800 2")  # valid JSON, invalid Unicode
    src = jsonl_source(tmp_path, lines)
    assert_raises_then_skips(tmp_path, src, "undecodable text", f"{src['path']}:3", "U+D800", n_good=5)


def test_invalid_utf8_is_undecodable_text(tmp_path):
    lines = [line.encode() for line in six_lines(tmp_path)]
    lines[2] = lines[2].replace(b"Say 2", b"Say \xff 2")
    src = jsonl_source(tmp_path, lines)
    assert_raises_then_skips(tmp_path, src, "undecodable text", f"{src['path']}:3", "", n_good=5)


def test_over_long_conversation_is_refused_before_tokenising(tmp_path):
    lines = six_lines(tmp_path)
    lines[4] = json.dumps({"id": "long", "conversations": [{"from": "human", "value": "x" * 5000},
                                                             {"from": "gpt", "value": "y"}]})  # fmt: skip
    src = jsonl_source(tmp_path, lines, max_text_chars=4000)
    assert_raises_then_skips(tmp_path, src, "conversation too long", f"{src['path']}:5", "5,001 characters", n_good=5)


def test_over_long_line_is_refused_unparsed(tmp_path, monkeypatch):
    lines = six_lines(tmp_path)
    lines[1] = '{"conversations": "' + "z" * 200_000 + '"}'  # over 8 * 100 + 65,536 bytes
    src = jsonl_source(tmp_path, lines, max_text_chars=100)
    parsed = []
    monkeypatch.setattr(json, "loads", lambda s, _real=json.loads: parsed.append(len(s)) or _real(s))
    assert_raises_then_skips(tmp_path, src, "record too long", f"{src['path']}:2", "66,336 bytes", n_good=5)
    assert max(parsed) < 20_000  # the 200 kB line never reached the parser


# --------------------------------------------------------------------------- JSON arrays


def ten_record_array(tmp_path: Path) -> tuple[Path, list[str]]:
    records = [{**r, "id": f"r{i}"} for i, r in enumerate(llava_records(tmp_path / "src/images", 10))]
    return tmp_path / "src/data.json", [json.dumps(r) for r in records]


def test_broken_record_in_json_array_is_skipped_alone(tmp_path):
    path, recs = ten_record_array(tmp_path)
    recs[2] = recs[2][:-12]  # record 2 loses its end: the next record's text is glued to it
    path.write_text("[\n" + ",\n".join(recs) + "\n]\n")
    src = {"name": "pool", "kind": "vlm", "format": "llava_json", "path": str(path)}
    errors = assert_raises_then_skips(tmp_path, src, "malformed JSON", f"{path}[2]", "line 4", n_good=9)
    assert "next record, at line 5" in errors[0]["detail"]
    out = tmp_path / "run-skip/catalog"
    ids = [i for f in sorted(out.glob("pool/part-*.parquet")) for i in pq.read_table(f).column("id").to_pylist()]
    assert ids == [f"pool/r{i}" for i in range(10) if i != 2]


def test_unrecoverable_json_array_names_where_reading_stopped(tmp_path):
    path, recs = ten_record_array(tmp_path)
    path.write_text("[\n" + ",\n".join(recs[:6]) + ",\n" + recs[6][:40])  # truncated inside record 6
    src = {"name": "pool", "kind": "vlm", "format": "llava_json", "path": str(path)}
    errors = assert_raises_then_skips(tmp_path, src, "malformed JSON", f"{path}[6]", "line 8", n_good=6)
    assert "with no closing ']' (truncated?)" in errors[0]["detail"]


# --------------------------------------------------------------------------- Parquet and LeRobot


def test_malformed_rows_of_a_catalog_parquet(tmp_path):
    write_png(tmp_path / "frames/ok.png", 3)

    def frames(episode: pa.Array) -> pa.Table:
        return pa.table({"id": [f"{episode[0]}", f"{episode[1]}"], "image_refs": [[{"path": "ok.png", "bytes": None}]] * 2,
                         "instruction": ["pick", "place"], "episode": episode, "frame": [0, 1],
                         "action": [[[0.1, 0.2]], [[0.3, 0.4]]]})  # fmt: skip

    pq.write_table(frames(pa.array([0, 1])), tmp_path / "frames/a.parquet")
    pq.write_table(frames(pa.array(["two", "3"])), tmp_path / "frames/b.parquet")  # a text episode column
    src = {"name": "frames", "kind": "vla", "format": "parquet", "path": str(tmp_path / "frames")}
    where = f"{tmp_path / 'frames/b.parquet'}:row 0"
    errors = assert_raises_then_skips(tmp_path, src, "malformed row", where, "episode: 'two'", n_good=2, n_bad=2)
    assert errors[1]["where"].endswith("b.parquet:row 1")


def test_corrupt_row_group_of_a_parquet_skips_only_its_rows(tmp_path):
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": [f"caption {i} " * 20 for i in range(6)]}), path, row_group_size=2)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 40] = b"\x55" * 40  # the middle row group's page header
    path.write_bytes(bytes(data))
    src = {"name": "caps", "kind": "vlm", "format": "parquet", "path": str(path)}
    errors = assert_raises_then_skips(tmp_path, src, "undecodable Parquet", f"{path}:row 2-3", "2 row(s) skipped", n_good=4)
    assert "row group 1" in errors[0]["detail"]


def lerobot_copy(tmp_path: Path, lerobot_v3) -> tuple[dict, Path]:
    root = tmp_path / "robot"
    shutil.copytree(lerobot_v3[0], root)
    return {"name": "robot", "kind": "vla", "format": "lerobot", "path": str(root)}, root


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_lerobot_data_parquet_skips_its_episodes(tmp_path, lerobot_v3):
    src, root = lerobot_copy(tmp_path, lerobot_v3)
    data_file = root / "data/chunk-000/file-000.parquet"
    truncate(data_file)
    good = jsonl_source(tmp_path, six_lines(tmp_path))
    with pytest.raises(SampleError) as exc:
        run_catalog(tmp_path, [src])
    assert (exc.value.reason, exc.value.where) == ("undecodable data file", f"{root} episode 0")
    assert str(data_file) in exc.value.detail
    out = run_catalog(tmp_path, [src, good], on_error="skip", run="run-skip")
    assert [(e["reason"], e["where"]) for e in errors_of(out)] == [("undecodable data file", f"{root} episode {e}") for e in range(3)]
    assert written(out) == 6


def test_truncated_lerobot_video_skips_its_episodes(tmp_path, lerobot_v3):
    src, root = lerobot_copy(tmp_path, lerobot_v3)
    truncate(root / "videos/observation.images.corner/chunk-000/file-000.mp4", 0.6)
    good = jsonl_source(tmp_path, six_lines(tmp_path))
    with pytest.raises(SampleError) as exc:
        run_catalog(tmp_path, [src])
    assert exc.value.where.startswith(f"{root} episode") and "file-000.mp4" in exc.value.detail
    out = run_catalog(tmp_path, [src, good], on_error="skip", run="run-skip")
    errors = errors_of(out)
    assert errors and {e["reason"] for e in errors} <= {"undecodable video", "video frame missing"}
    assert json.loads((out / "manifest.json").read_text())["sources"]["pool"]["written"] == 6
