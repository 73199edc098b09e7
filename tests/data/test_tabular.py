"""Parquet and HF-on-disk sources (images as bytes or paths), and the Parquet export round trip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from catalog_fixtures import write_png
from PIL import Image

from midtrain.data.images import load_image
from midtrain.data.sources import DatasetSource
from midtrain.data.tabular import HFDiskReader, ParquetReader, write_catalog_parquet
from midtrain.runs import StageError


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def read_all(reader_cls, path: Path, **kw) -> list:
    reader = reader_cls(DatasetSource(name="t", kind="vlm", format="parquet", path=path, **kw), seed=0)
    return [item for _, item in reader.iter_samples()]


def test_parquet_vqa_columns_with_image_bytes(tmp_path):
    table = pa.table({
        "question": [f"q{i}" for i in range(5)],
        "answer": [f"a{i}" for i in range(5)],
        "image": [{"bytes": png_bytes(10 * i), "path": None} for i in range(5)],
    })
    pq.write_table(table, tmp_path / "vqa.parquet", row_group_size=2)
    rows = read_all(ParquetReader, tmp_path / "vqa.parquet")
    assert [r["id"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[3]["messages"] == [{"role": "user", "content": "<image>\nq3"}, {"role": "assistant", "content": "a3"}]
    assert np.asarray(load_image(rows[3]["image_refs"][0]))[0, 0, 0] == 30
    assert rows[3]["origin"] == f"{tmp_path / 'vqa.parquet'}:row 3"
    # seeded cap reads only the chosen rows, in file order
    capped = read_all(ParquetReader, tmp_path / "vqa.parquet", max_samples=2, seed=3)
    assert len(capped) == 2 and [r["id"] for r in capped] == sorted(r["id"] for r in capped)


def test_parquet_directory_of_sharegpt_files_with_relative_paths(tmp_path):
    write_png(tmp_path / "imgs" / "a.png", 1)
    conv = [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}]
    for k in range(2):
        pq.write_table(pa.table({"id": [f"r{k}"], "conversations": [conv], "images": [["imgs/a.png"]]}),
                       tmp_path / f"part{k}.parquet")
    rows = read_all(ParquetReader, tmp_path)
    assert [r["id"] for r in rows] == ["r0", "r1"]
    assert rows[1]["image_refs"][0]["path"] == str((tmp_path / "imgs" / "a.png").resolve())
    assert rows[1]["origin"] == f"{tmp_path / 'part1.parquet'}:row 0"


def test_parquet_without_conversation_columns_names_the_keys_to_set(tmp_path):
    pq.write_table(pa.table({"foo": [1]}), tmp_path / "x.parquet")
    with pytest.raises(StageError, match="messages_column / response_column"):
        read_all(ParquetReader, tmp_path / "x.parquet")
    with pytest.raises(StageError, match="image_column: column 'pic' not found"):
        read_all(ParquetReader, tmp_path / "x.parquet", image_column="pic")


def test_hf_save_to_disk_with_image_feature_and_splits(tmp_path):
    import datasets

    write_png(tmp_path / "p.png", 77)
    features = datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    })
    msgs = [{"role": "user", "content": "<image>what"}, {"role": "assistant", "content": "that"}]
    ds = datasets.Dataset.from_dict(
        {"id": ["x", "y", "z"], "image": [str(tmp_path / "p.png")] * 3, "messages": [msgs] * 3}, features=features
    )
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "hf"))
    rows = read_all(HFDiskReader, tmp_path / "hf")
    assert [r["id"] for r in rows] == ["x", "y", "z"]
    assert rows[0]["messages"] == msgs
    assert np.asarray(load_image(rows[0]["image_refs"][0]))[0, 0, 0] == 77
    assert rows[2]["origin"] == f"{tmp_path / 'hf'}[train]:row 2"
    assert [r["id"] for r in read_all(HFDiskReader, tmp_path / "hf", split="test")] == ["x"]
    with pytest.raises(StageError, match="choose one of train, test"):
        read_all(HFDiskReader, tmp_path / "hf", split="validation")
    # a shuffled selection saved to disk keeps its order
    ds.shuffle(seed=0).save_to_disk(str(tmp_path / "hf2"))
    assert [r["id"] for r in read_all(HFDiskReader, tmp_path / "hf2")] == ds.shuffle(seed=0)["id"]


def test_catalog_parquet_export_round_trips_and_loads_in_datasets(tmp_path):
    import datasets

    write_png(tmp_path / "a.png", 42)
    rows = [
        {"id": "p/0", "source": "p", "kind": "vlm", "image_refs": [{"path": str(tmp_path / "a.png"), "bytes": None}],
         "messages": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}], "origin": "o"},
        {"id": "r/0/1", "source": "r", "kind": "vla", "image_refs": [{"path": None, "bytes": png_bytes(9)}],
         "instruction": "pick", "episode": 0, "frame": 1, "state": [0.5, 1.5],
         "action": [[1.0, 2.0], [1.0, 2.0]], "action_mask": [True, False], "origin": "o2"},
    ]
    out = tmp_path / "export.parquet"
    assert write_catalog_parquet(iter(rows), out, embed_images=True) == 2
    back = read_all(ParquetReader, out)
    assert [b["id"] for b in back] == ["p/0", "r/0/1"]
    assert back[0]["messages"] == rows[0]["messages"]
    assert back[1]["action"] == rows[1]["action"] and back[1]["action_mask"] == [True, False]
    assert back[1]["instruction"] == "pick" and back[1]["state"] == [0.5, 1.5]
    assert back[0]["image_refs"][0]["bytes"] == (tmp_path / "a.png").read_bytes()  # embedded
    hf = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(hf[0]["image_refs"][0], Image.Image) and hf[0]["image_refs"][0].getpixel((0, 0))[0] == 42
