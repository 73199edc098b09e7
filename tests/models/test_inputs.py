"""Catalog rows -> chat conversations -> processor batches, for every architecture."""

import numpy as np
import pytest
import torch

from catalog_rows import png_ref
from midtrain.models import build_batch, conversation_of
from midtrain.models.tiny import ARCHS as TINY_ARCHS
from midtrain.runs import SampleError

RNG = np.random.default_rng(0)
IMG = png_ref(RNG, 60, 80)
ANSWER = "A red block and a bowl."
ROWS = [
    {"id": "v/0", "kind": "vlm", "image_refs": [IMG], "origin": "v.json:1",
     "messages": [{"role": "user", "content": "<image>\nWhat is on the table?"}, {"role": "assistant", "content": ANSWER},
                  {"role": "user", "content": "Count them."}, {"role": "assistant", "content": "two"}]},
    {"id": "r/0/0", "kind": "vla", "image_refs": [png_ref(RNG, 64, 64)], "instruction": "pick up the red block",
     "origin": "episode 0 frame 0"},
    {"id": "t/0", "kind": "vlm", "image_refs": [], "origin": "t.json:3",
     "messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "one two three"}]},
    {"id": "bad/0", "kind": "vlm", "image_refs": [{"path": None, "bytes": b"not an image"}], "origin": "bad.json:7",
     "messages": [{"role": "user", "content": "<image> hi"}]},
]  # fmt: skip


def test_conversation_places_images_and_drops_answers_on_request():
    row = {"id": "x", "image_refs": [IMG, IMG, IMG], "messages": [
        {"role": "user", "content": "<image>\nCompare these."},
        {"role": "assistant", "content": "See <image> and"},
        {"role": "user", "content": "and <image>?"},
    ]}  # fmt: skip
    messages, order = conversation_of(row)
    assert [b["type"] for b in messages[0]["content"]] == ["image", "text"]
    assert messages[0]["content"][1]["text"] == "Compare these."  # LLaVA's newline after <image> is dropped
    assert order == [0, 1, 2]
    messages, order = conversation_of(row, include_assistant=False)
    assert [m["role"] for m in messages] == ["user", "user"] and order == [0, 2]
    # images without a placeholder go first in the first user turn
    messages, order = conversation_of({"id": "y", "image_refs": [IMG], "messages": [{"role": "user", "content": "Hi"}]})
    assert [b["type"] for b in messages[0]["content"]] == ["image", "text"] and order == [0]
    # a VLA frame: camera image then instruction, one user turn
    messages, order = conversation_of(ROWS[1])
    assert messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "pick up the red block"}]}]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"id": "a", "image_refs": [], "messages": [{"role": "user", "content": "<image> x"}]}, "more <image> placeholders"),
        ({"id": "b", "image_refs": [], "messages": [{"role": "robot", "content": "x"}]}, "unknown message role"),
        ({"id": "c", "image_refs": [], "messages": None, "instruction": None}, "empty sample"),
    ],
)
def test_conversation_rejects_bad_rows(row, reason):
    with pytest.raises(SampleError, match=reason):
        conversation_of(row)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_build_batch_pads_right_marks_answers_and_reports_bad_rows(arch, loaded_vlm):
    model, processor = loaded_vlm(arch)
    batch, info = build_batch(ROWS, processor, answer_mask=True)
    assert info.positions.tolist() == [0, 1, 2]
    assert [(e.reason, e.sample_id) for e in info.errors] == [("undecodable image", "bad/0")]
    attn = batch["attention_mask"]
    assert attn.sum(1).tolist() == info.lengths.tolist()
    assert bool((attn[:, :-1] >= attn[:, 1:]).all())  # right padding: ones then zeros
    assert "offset_mapping" not in batch and "labels" not in batch
    answers = [processor.tokenizer.decode(batch["input_ids"][i][info.answer_mask[i]]) for i in range(3)]
    # answer tokens are the assistant text (plus the template's end-of-turn marker), nothing else
    assert ANSWER in answers[0] and "two" in answers[0] and "table" not in answers[0]
    assert answers[1] == ""  # a VLA frame has no answer
    assert "one two three" in answers[2] and "Count" not in answers[2]
    # image tokens are in place: the model accepts the batch
    with torch.inference_mode():
        out = model.model(**{k: v for k, v in batch.items()}, use_cache=False)
    assert out.last_hidden_state.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3", "paligemma"])
def test_max_length_truncates_text_or_skips(arch, loaded_vlm):
    _, processor = loaded_vlm(arch)
    _, full = build_batch(ROWS[:3], processor)
    longest = int(full.lengths.max())
    batch, info = build_batch(ROWS[:3], processor, max_length=longest - 2)
    assert info.positions.tolist() == [0, 1, 2] and not info.errors
    assert info.lengths.max() == longest - 2 == batch["input_ids"].shape[1]
    assert info.truncated.tolist() == (full.lengths > longest - 2).tolist()
    _, skipped = build_batch(ROWS[:3], processor, max_length=longest - 2, overlong="skip")
    assert {e.reason for e in skipped.errors} == {"over-long sample"} and len(skipped.errors) == int(info.truncated.sum())
    # a cut that would drop image tokens skips the sample instead of corrupting it
    _, tiny = build_batch(ROWS[1:2], processor, max_length=3)
    assert tiny.positions.tolist() == [] and tiny.errors[0].reason == "over-long sample"
    assert "image tokens" in tiny.errors[0].detail and tiny.errors[0].sample_id == "r/0/0"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_answer_masks_of_batches_that_start_with_a_text_only_sample(arch, loaded_vlm):
    """A text-only sample first (transformers then tried to tensorise Idefics3's ragged replacement
    offsets and failed) or alone (InternVL returned an empty tensor): rows with images go first,
    positions say where each row went, and the masks are those of the rows batched alone."""
    _, processor = loaded_vlm(arch)
    rows = [ROWS[2], ROWS[0]]
    batch, info = build_batch(rows, processor, answer_mask=True)
    if arch == "paligemma":  # PaliGemma needs an image per prompt: mixed batches pass, text-only rows alone do not
        assert build_batch(rows[:1], processor, answer_mask=True)[1].errors[0].reason == "processor rejected the sample"
        return
    assert info.positions.tolist() == [1, 0] and not info.errors
    for i, pos in enumerate(info.positions):
        alone, alone_info = build_batch([rows[pos]], processor, answer_mask=True)
        n = int(alone_info.lengths[0])
        assert batch["input_ids"][i, :n].tolist() == alone["input_ids"][0, :n].tolist()
        assert info.answer_mask[i, :n].tolist() == alone_info.answer_mask[0, :n].tolist()
        assert alone_info.answer_mask[0].any()
