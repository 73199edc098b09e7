"""``midtrain align``'s bad input: parts that cannot be joined fail in one line before any work; bad
alignment images follow ``on_error``."""

from __future__ import annotations

import json

import pytest
from test_align_stage import tiny_config

from midtrain.align.assemble import AssemblyError, check_parts
from midtrain.align.stage import run_align
from midtrain.config import ConfigError
from midtrain.runs import RunDir, SampleError


@pytest.mark.parametrize("tower, lm, message", [
    ("lm", "lm", "is a 'llama' model; align takes"),
    ("tower", "encoder_lm", "is a 'bert' model, not a causal language model"),
    ("tower", "lm_no_template", "has no chat template"),
    ("odd_tower", "lm", "image size 30 is not a multiple of its patch size 8"),
])  # fmt: skip
def test_parts_that_cannot_be_joined_fail_in_one_line_before_any_work(tiny_parts, tmp_path, tower, lm, message):
    run = RunDir(tmp_path / "run")
    with pytest.raises(AssemblyError, match=message) as err:
        run_align(tiny_config(tiny_parts, vision_tower=str(tiny_parts[tower]), language_model=str(tiny_parts[lm])), run)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("base"))


def test_more_image_tokens_than_room_fails_before_work(tiny_parts):
    with pytest.raises(AssemblyError, match="16 image tokens per image, which leaves no room"):
        check_parts(str(tiny_parts["tower"]), str(tiny_parts["lm"]), None, max_length=16)
    with pytest.raises(AssemblyError, match="has 3 decoder layers; got 5"):
        check_parts(str(tiny_parts["tower"]), str(tiny_parts["lm"]), 5, max_length=128)


def test_missing_directory_and_half_given_data_are_named(tiny_parts, tmp_path):
    with pytest.raises(AssemblyError, match="no such directory"):
        check_parts(str(tmp_path / "nowhere"), str(tiny_parts["lm"]), None, 128)
    with pytest.raises(ConfigError, match="instructions: give both stages' data"):
        tiny_config(tiny_parts, captions=[{"name": "c", "kind": "vlm", "format": "llava_json", "path": "x.json"}])


def _user_data(tmp_path, broken: bool):
    from PIL import Image

    (tmp_path / "data" / "images").mkdir(parents=True)
    records = []
    for i in range(10):
        Image.new("RGB", (32, 32), (20 * i, 100, 200)).save(tmp_path / "data" / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"}]})  # fmt: skip
    if broken:
        (tmp_path / "data" / "images" / "3.png").write_bytes(b"not a png")
        (tmp_path / "data" / "images" / "5.png").unlink()
    (tmp_path / "data" / "d.json").write_text(json.dumps(records))
    src = {"kind": "vlm", "format": "llava_json", "path": str(tmp_path / "data" / "d.json"), "verify_images": False}
    return [{"name": "caps", **src}], [{"name": "vqa", **src}]


def test_missing_or_undecodable_images_follow_on_error(tiny_parts, tmp_path):
    captions, instructions = _user_data(tmp_path, broken=True)
    with pytest.raises(SampleError):
        run_align(tiny_config(tiny_parts, captions=captions, instructions=instructions), RunDir(tmp_path / "raise"))
    out = run_align(tiny_config(tiny_parts, captions=captions, instructions=instructions, on_error="skip"), RunDir(tmp_path / "skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pretrain_samples"] == manifest["counts"]["finetune_samples"] == 8
    assert manifest["counts"]["images_cached"] == 8
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted({e["id"].split("/")[-1] for e in errors}) == ["3", "5"]
    assert not (out / "corpus").exists()  # the user's data replaces the synthetic web
