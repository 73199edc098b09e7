"""LLaVA / ShareGPT reading (JSON array streamed element by element, JSON Lines) and the exporter round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from catalog_fixtures import write_png

from midtrain.data.images import load_image
from midtrain.data.llava import LlavaJsonlReader, LlavaJsonReader, normalize_conversation, write_llava_json
from midtrain.data.sources import DatasetSource
from midtrain.runs import SampleError


def read_all(fmt: str, path: Path, **kw) -> list:
    src = DatasetSource(name="s", kind="vlm", format=fmt, path=path, **kw)
    reader = (LlavaJsonReader if fmt == "llava_json" else LlavaJsonlReader)(src, seed=src.seed or 0)
    return [item for _, item in reader.iter_samples()]


@pytest.mark.parametrize("fmt,name", [("llava_json", "data.json"), ("llava_jsonl", "data.jsonl")])
def test_reader_normalises_roles_placeholders_and_paths(llava_dir, fmt, name):
    rows = read_all(fmt, llava_dir / name)
    assert [r["id"] for r in rows] == ["s0", "s1", "2", "s3", "s4", "5"]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "<image>\nWhat is 0?"}, {"role": "assistant", "content": "It is 0."}
    ]
    # a messages-style record with no placeholder gets one prepended to the first user turn
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert rows[1]["messages"][1]["content"] == "<image>\nDescribe 1."
    assert rows[2]["image_refs"] == [] and rows[2]["messages"][1] == {"role": "assistant", "content": "2"}
    ref = rows[1]["image_refs"][0]
    assert ref["bytes"] is None and Path(ref["path"]) == (llava_dir / "images/img1.png").resolve()
    where = rows[3]["origin"]
    assert where == (f"{llava_dir / name}[3]" if fmt == "llava_json" else f"{llava_dir / name}:4")


def test_alpaca_records():
    rec = {"instruction": "<image>Name it.", "input": "Be short.", "output": "A cup.", "images": ["c.png"],
           "history": [["hi", "hello"]], "system": "You are a robot."}
    messages, images = normalize_conversation(rec, "a.json[0]", "0")
    assert images == ["c.png"]
    assert messages == [
        {"role": "system", "content": "You are a robot."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "<image>Name it.\nBe short."},
        {"role": "assistant", "content": "A cup."},
    ]


def test_content_parts_and_llamafactory_roles():
    rec = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "hi"}]},
                        {"role": "function_call", "content": "x"}, {"role": "observation", "content": "y"}]}
    messages, images = normalize_conversation(rec, "f:1", "0")
    assert images == ["a.png"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "<image>\nhi"


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
         "image placeholder mismatch"),
        ({"conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}]},
         "image placeholder mismatch"),
        ({"conversations": [{"from": "narrator", "value": "hi"}]}, "unknown role"),
        ({"conversations": [{"from": "human"}]}, "missing required field"),
        ({"conversations": []}, "missing required field"),
    ],
)
def test_bad_conversations_are_sample_errors(record, reason):
    with pytest.raises(SampleError) as exc:
        normalize_conversation(record, "data.json[7]", "7")
    assert exc.value.reason == reason and exc.value.where == "data.json[7]"


def test_sample_cap_is_seeded_and_streams_in_file_order(llava_dir):
    a = [r["id"] for r in read_all("llava_json", llava_dir / "data.json", max_samples=3, seed=1)]
    b = [r["id"] for r in read_all("llava_json", llava_dir / "data.json", max_samples=3, seed=1)]
    c = [r["id"] for r in read_all("llava_jsonl", llava_dir / "data.jsonl", max_samples=3, seed=1)]
    d = [r["id"] for r in read_all("llava_json", llava_dir / "data.json", max_samples=3, seed=2)]
    assert a == b == c and len(a) == 3
    order = ["s0", "s1", "2", "s3", "s4", "5"]
    assert a == sorted(a, key=order.index)
    assert a != d  # a different seed draws a different subset (fixed seeds: not flaky)


def test_json_that_is_really_jsonl_gets_a_hint(llava_dir):
    from midtrain.runs import StageError

    with pytest.raises(StageError, match="use format: llava_jsonl"):
        read_all("llava_json", llava_dir / "data.jsonl")


def test_truncated_json_array_reports_where_reading_stopped(tmp_path):
    text = json.dumps([{"conversations": [{"from": "human", "value": "a"}]}] * 3)
    (tmp_path / "t.json").write_text(text[: len(text) - 20])
    items = read_all("llava_json", tmp_path / "t.json")
    assert all(isinstance(i, dict) for i in items[:-1])
    assert isinstance(items[-1], SampleError) and items[-1].reason == "malformed JSON"
    assert items[-1].where == f"{tmp_path / 't.json'}[{len(items) - 1}]"
    capped = read_all("llava_json", tmp_path / "t.json", max_samples=2, seed=0)  # the count includes the bad record
    assert len(capped) == 2 and all(c in items or isinstance(c, SampleError) for c in capped)


@pytest.mark.parametrize("suffix,mode", [(".json", "copy"), (".jsonl", "link"), (".json", "reference")])
def test_write_then_read_gives_the_same_samples(llava_dir, tmp_path, suffix, mode):
    from midtrain.data.images import encode_image

    rows = read_all("llava_json", llava_dir / "data.json")
    rows = [{**r, "id": f"src/{r['id']}"} for r in rows]
    # one sample with an image stored as bytes (as LeRobot frames or HF datasets give them)
    embedded = np.full((8, 8, 3), 200, dtype=np.uint8)
    rows.append({"id": "src/bytes", "image_refs": [{"path": None, "bytes": encode_image(embedded)}],
                 "messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]})
    out = tmp_path / "export" / f"mix{suffix}"
    counts = write_llava_json(rows, out, tmp_path / "export" / "images", image_mode=mode, llamafactory_name="mix")
    assert counts == {"records": 7, "images": 5}
    # "reference" writes absolute paths into the source's image folder, outside the export's root
    back = read_all("llava_json" if suffix == ".json" else "llava_jsonl", out, allow_outside_root=mode == "reference")
    assert [b["id"] for b in back] == [r["id"] for r in rows]
    for r, b in zip(rows, back):
        assert b["messages"] == r["messages"]
        assert len(b["image_refs"]) == len(r["image_refs"])
        for ra, rb in zip(r["image_refs"], b["image_refs"]):
            assert np.array_equal(np.asarray(load_image(ra)), np.asarray(load_image(rb)))
    if mode == "link":
        assert any(p.is_symlink() for p in (tmp_path / "export" / "images").iterdir())
    if mode != "reference":  # records point into the export's own images/ folder, links included
        text = out.read_text()
        records = [json.loads(line) for line in text.splitlines()] if suffix == ".jsonl" else json.loads(text)
        paths = [p for rec in records for p in ([rec["image"]] if "image" in rec else rec.get("images", []))]
        assert paths and all(p.startswith("images/") for p in paths)
    info = json.loads((out.parent / "dataset_info.json").read_text())
    assert info["mix"]["formatting"] == "sharegpt" and info["mix"]["file_name"] == out.name
    if suffix == ".json":
        first = json.loads(out.read_text())[0]
        assert set(first) == {"id", "image", "conversations"} and first["conversations"][0]["from"] == "human"


def test_writer_leaves_no_partial_file_when_a_row_is_bad(tmp_path):
    rows = [{"id": "a", "image_refs": [], "messages": [{"role": "user", "content": "x"}]},
            {"id": "b", "image_refs": [], "messages": None, "instruction": "pick"}]
    with pytest.raises(ValueError, match="b: has no messages"):
        write_llava_json(rows, tmp_path / "out.json", tmp_path / "img")
    assert not (tmp_path / "out.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json")]


def test_image_root_overrides_the_json_folder(tmp_path):
    write_png(tmp_path / "pics" / "x.png", 5)
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.png", "conversations": [{"from": "human", "value": "q"}]}) + "\n")
    rows = read_all("llava_jsonl", tmp_path / "d.jsonl", image_root=tmp_path / "pics")
    assert rows[0]["image_refs"][0]["path"] == str((tmp_path / "pics" / "x.png").resolve())
